"""From `policynet.train` to the segmenter: the segmenter's policy network must compute exactly
the function that was trained. efficientnet_lite0 and tf_efficientnet_lite0 share every
state-dict key but pad differently, so a checkpoint loaded into the other backbone loads
cleanly and selects superpatches almost at random (this happened in the demo: in-situ top-4
purity 0.63 instead of 0.99). The backbone recorded in the config.json beside the checkpoint
therefore travels with it."""
import json

import pytest
import torch
from click.testing import CliRunner

from policynet import train as pn_train
from segm import train as train_mod
from segm.model import build_net_kwargs, create_segmenter
from segm.model.policy import PolicyNet, load_policy_checkpoint
from segm.model.spec import recorded_policy_backbone as checkpoint_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tf_policy(synthetic_root, tmp_path_factory):
    """A policy trained for one iteration with the tf_ backbone (as `make demo` trains it)."""
    logdir = tmp_path_factory.mktemp("policynet")
    cfg = pn_train.TrainConfig(
        dataset="synthetic", data_root=str(synthetic_root), logdir=str(logdir), exp_name="tf",
        backbone="tf_efficientnet_lite0", crop_size=64, batch_size_train=2, batch_size_test=4,
        num_workers=0, eval_train_batches=1, eval_iterations=1000, num_iterations=1,
        pretrained="none", device="cpu", progress=False,
    )
    pn_train.train(cfg)
    return logdir / "tf" / "model.pth"


def test_segmenter_runs_the_policy_exactly_as_trained(tf_policy):
    assert checkpoint_backbone(tf_policy) == "tf_efficientnet_lite0"
    net = build_net_kwargs("vit_tiny_patch16_384", "linear", 5, 64, policy_method="policy_net",
                           num_shared=2, policynet_ckpt=str(tf_policy), n_layers=1)
    assert net["policy_backbone"] == "tf_efficientnet_lite0"
    model = create_segmenter(net).eval()
    trained = PolicyNet("tf_efficientnet_lite0").eval()
    trained.load_state_dict(torch.load(tf_policy, weights_only=True))
    im = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        scores, _ = model.reducer.scorer(im, None)
        want = torch.softmax(trained(im)["logits"], dim=1)[:, 1].reshape(3, -1)
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-5)


def test_policy_loaded_into_the_other_backbone_is_refused(tf_policy):
    with pytest.raises(ValueError, match="pass --policy-backbone tf_efficientnet_lite0"):
        load_policy_checkpoint(PolicyNet("efficientnet_lite0"), tf_policy)
    with pytest.raises(ValueError, match="trained with backbone 'tf_efficientnet_lite0'"):
        build_net_kwargs("vit_tiny_patch16_384", "linear", 5, 64, policy_method="policy_net",
                         num_shared=2, policynet_ckpt=str(tf_policy), policy_backbone="efficientnet_lite0")
    net = build_net_kwargs("vit_tiny_patch16_384", "linear", 5, 64, policy_method="policy_net",
                           num_shared=2, policynet_ckpt=str(tf_policy))
    net["policy_backbone"] = "efficientnet_lite0"  # a hand-edited variant.yml
    with pytest.raises(ValueError, match="trained with backbone 'tf_efficientnet_lite0'"):
        create_segmenter(net)


def _train_args(log_dir, root, ckpt, *extra):
    return ["--log-dir", str(log_dir), "--dataset", "synthetic", "--data-root", str(root),
            "--backbone", "vit_tiny_patch16_384", "--encoder-layers", "1", "--decoder-layers", "1",
            "--im-size", "64", "--crop-size", "64", "--pretrained", "none", "--num-workers", "0",
            "--policy-method", "policy_net", "--num-tokens-shared", "2", "--policynet-ckpt", str(ckpt),
            "--batch-size", "2", "--iterations", "1", "--eval-freq", "0", *extra]


def test_train_records_the_policy_backbone_and_refuses_a_conflict(tf_policy, synthetic_root, tmp_path):
    from segm.config import load_yaml

    bad = CliRunner().invoke(train_mod.main, _train_args(tmp_path / "bad", synthetic_root, tf_policy,
                                                         "--policy-backbone", "efficientnet_lite0"))
    assert bad.exit_code != 0 and "trained with backbone 'tf_efficientnet_lite0'" in bad.output
    assert bad.output.strip().count("\n") == 0, bad.output
    assert not (tmp_path / "bad").exists()

    ok = CliRunner().invoke(train_mod.main, _train_args(tmp_path / "ok", synthetic_root, tf_policy),
                            catch_exceptions=False)
    assert ok.exit_code == 0, ok.output
    variant = load_yaml(tmp_path / "ok" / "variant.yml")
    assert variant["net_kwargs"]["policy_backbone"] == "tf_efficientnet_lite0"


def test_reference_checkpoint_without_config_keeps_the_default(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(PolicyNet().state_dict(), path)
    assert checkpoint_backbone(path) is None
    (tmp_path / "config.json").write_text(json.dumps({"lr": 1e-4}))
    assert checkpoint_backbone(path) is None
    load_policy_checkpoint(PolicyNet(), path)  # no record: nothing to check


def test_unreadable_policy_record_is_an_error(tmp_path):
    """A record that exists but cannot be read must not fall back to the default backbone."""
    path = tmp_path / "model.pth"
    torch.save(PolicyNet().state_dict(), path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*config.json"):
        checkpoint_backbone(path)
    net = {"backbone": "vit_tiny_patch16_384", "n_cls": 5, "image_size": (64, 64), "decoder": "linear",
           "policy_method": "policy_net", "policy_schedule": (8, 2), "policynet_ckpt": str(path)}
    with pytest.raises(ValueError, match="cannot read .*config.json"):
        create_segmenter(net)
