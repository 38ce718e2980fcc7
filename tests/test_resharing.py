"""Token sharing on a checkpoint trained without it: the content (or any) policy chosen on the
command line of evaluation, inference and the benchmark, with no retraining; the checkpoint
file is never modified."""
import hashlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import segm
from segm.config import load_yaml
from segm.eval.miou import main as miou_main
from segm.inference import main as inference_main
from segm.model.factory import reshare
from tests.helpers.models import CROP, make_model_dir
from tests.helpers.train import make_policy_ckpt, run_cli, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def plain_run(synthetic_root, tmp_path):
    ckpt, model, variant = make_model_dir(tmp_path, synthetic_root, policy_method="no_sharing")
    return ckpt, model, variant


def test_reshare_keeps_the_trained_weights_and_changes_only_the_policy(plain_run):
    _, model, variant = plain_run
    shared, net = reshare(model, variant["net_kwargs"], "content", num_shared=2)
    assert shared.encoder is model.encoder and shared.decoder is model.decoder
    assert (shared.reducer.scorer_name, shared.reducer.num_shared, net["policy_schedule"]) == ("content", 2, (8, 2))
    assert model.reduction_method == "none"  # the loaded model is not changed
    im = torch.randn(2, 3, CROP, CROP)
    with torch.no_grad():
        out = shared.forward_all(im)
        again = shared.forward_all(im)
    assert out.layout.num_tokens == 16 - 3 * 2
    assert torch.equal(out.logits, again.logits)
    with torch.no_grad():  # S = 0 is the trained model itself
        zero, _ = reshare(model, variant["net_kwargs"], "content", num_shared=0)
        assert torch.equal(zero(im), model(im))


def test_eval_cli_with_the_content_policy_leaves_the_checkpoint_unchanged(plain_run):
    ckpt, _, _ = plain_run
    before = _digest(ckpt), _digest(ckpt.parent / "variant.yml")
    common = [str(ckpt), "synthetic", "--num-workers", "0", "--frac-dataset", "0.25"]
    plain = CliRunner().invoke(miou_main, common, catch_exceptions=False)
    assert plain.exit_code == 0, plain.output
    result = CliRunner().invoke(miou_main, common + ["--policy-method", "content", "--num-tokens-shared", "2"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "policy content (U, S) = (8, 2)" in result.output
    scores = load_yaml(ckpt.parent / "scores_ss_content_s2_frac0.25.yml")
    assert scores["policy"] == {"method": "content", "num_shared": 2, "num_notshared": 8, "policynet_ckpt": None}
    assert load_yaml(ckpt.parent / "scores_ss_frac0.25.yml")["policy"]["method"] == "no_sharing"  # not replaced
    assert (_digest(ckpt), _digest(ckpt.parent / "variant.yml")) == before


@pytest.mark.parametrize("extra, fragment", [
    (["--policy-method", "content", "--num-tokens-shared", "5"], "out of range"),
    (["--num-tokens-shared", "2"], "give --policy-method too"),
    (["--policy-method", "policy_net", "--num-tokens-shared", "2"], "needs --policynet-ckpt"),
    (["--policy-method", "content"], "needs a token budget"),
])
def test_bad_policy_choices_give_one_line(plain_run, extra, fragment):
    ckpt, _, _ = plain_run
    result = CliRunner().invoke(miou_main, [str(ckpt), "synthetic", "--num-workers", "0", *extra])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.output


def test_eval_with_a_policy_network_of_the_wrong_backbone_is_refused(plain_run, tmp_path):
    ckpt, _, _ = plain_run
    policy = tmp_path / "policy" / "model.pth"
    policy.parent.mkdir()
    make_policy_ckpt(policy)
    (policy.parent / "config.json").write_text('{"backbone": "efficientnet_lite0"}')
    args = [str(ckpt), "synthetic", "--num-workers", "0", "--frac-dataset", "0.25", "--policy-method", "policy_net",
            "--num-tokens-shared", "2", "--policynet-ckpt", str(policy)]
    assert CliRunner().invoke(miou_main, args, catch_exceptions=False).exit_code == 0
    bad = CliRunner().invoke(miou_main, args + ["--policy-backbone", "tf_efficientnet_lite0"])
    assert bad.exit_code != 0 and "trained with backbone 'efficientnet_lite0'" in bad.output


def test_inference_cli_with_the_content_policy_writes_sharing_maps(plain_run, tmp_path):
    ckpt, _, _ = plain_run
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (CROP, 2 * CROP, 3), dtype=np.uint8)).save(src / "a.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(inference_main, ["--model-path", str(ckpt), "-i", str(src), "-o", str(out), "--cpu",
                                                 "--show-sharing", "--policy-method", "content",
                                                 "--num-tokens-shared", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_sharing.png"]


def test_training_with_the_content_policy(synthetic_root, tmp_path):
    log_dir = tmp_path / "run"
    result = run_cli(tiny_args(log_dir, synthetic_root, "--policy-method", "content", "--num-tokens-shared", "2",
                               "--iterations", "2", "--batch-size", "2", "--eval-freq", "0"))
    assert result.exit_code == 0, result.output
    model, variant = segm.load_model(log_dir / "checkpoint.pth")
    assert variant["net_kwargs"]["policy_method"] == "content" and model.reducer.num_shared == 2


def test_bench_times_the_content_policy_on_a_plain_checkpoint(plain_run):
    from segm import bench

    ckpt, _, _ = plain_run
    variants, _ = bench.build_variants(bench.BenchConfig(model_path=str(ckpt), backbone=None, with_content=True,
                                                         num_shared=2))
    assert [(v.name, v.policy, v.num_shared) for v in variants] == [
        ("no_sharing", "no_sharing", 0), ("cts", "policy_net", 2), ("content", "content", 2)]
    content = variants[-1].model
    with torch.no_grad():
        assert content.forward_all(torch.randn(1, 3, CROP, CROP)).layout.num_tokens == 10
