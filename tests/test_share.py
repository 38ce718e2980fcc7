"""A trained model shared as one folder (safetensors + config.json + model card) loads back
exactly, without unpickling, into every command that takes a checkpoint."""
import json

import pytest
import torch
from click.testing import CliRunner

import segm
from segm.model.hub import share_model
from segm.share import main as share_main
from tests.helpers.models import CROP, K, make_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def _policy_net_run(tmp_path, data_root):
    """A policy_net checkpoint: its policy weights live in the state dict."""
    from segm.model import save_model
    from segm.model.factory import write_variant
    from tests.helpers.models import tiny_variant

    variant = tiny_variant(data_root, "policy_net")
    model = segm.create_segmenter(variant["net_kwargs"], policy_ckpt_required=False)
    torch.nn.init.normal_(model.policy_net.head.weight)  # a policy that is not the default init
    (tmp_path / "run").mkdir()
    save_model(model, variant, tmp_path / "run" / "checkpoint.pth")
    write_variant(variant, tmp_path / "run")
    return tmp_path / "run" / "checkpoint.pth"


@pytest.mark.parametrize("policy", ["no_sharing", "random", "content", "policy_net"])
def test_share_then_load_gives_identical_logits(synthetic_root, tmp_path, policy):
    if policy == "policy_net":
        ckpt = _policy_net_run(tmp_path, synthetic_root)
    else:
        ckpt, _, _ = make_model_dir(tmp_path, synthetic_root, policy_method=policy)
    out = tmp_path / "shared"
    result = CliRunner().invoke(share_main, [str(ckpt), str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    original, _ = segm.load_model(ckpt)
    shared, variant = segm.load_model(out)
    assert variant["net_kwargs"]["policy_method"] == policy
    im = torch.randn(2, 3, CROP, CROP)
    with torch.no_grad():
        assert torch.equal(shared(im), original(im))
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "synthetic" and len(config["class_names"]) == K and len(config["palette"]) == K
    assert config["policy"]["method"] == policy and config["crop_size"] == [CROP, CROP]


def test_a_folder_with_only_a_pickle_is_refused(synthetic_root, tmp_path):
    ckpt, model, variant = make_model_dir(tmp_path, synthetic_root)
    out = share_model(model, variant, tmp_path / "shared")
    (out / "model.safetensors").unlink()
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin is a pickle and is never loaded"):
        segm.load_model(out)


def test_sharing_refuses_a_non_empty_folder(synthetic_root, tmp_path):
    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root)
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(share_main, [str(ckpt), str(out)])
    assert result.exit_code != 0 and "is not empty" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_commands_take_the_shared_folder(synthetic_root, tmp_path):
    from segm.eval.miou import main as miou_main

    ckpt, model, variant = make_model_dir(tmp_path, synthetic_root)
    out = share_model(model, variant, tmp_path / "shared")
    result = CliRunner().invoke(miou_main, [str(out), "synthetic", "--data-root", str(synthetic_root),
                                            "--num-workers", "0", "--frac-dataset", "0.25"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (out / "scores_ss.yml").is_file()
