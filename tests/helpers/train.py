"""Running `python -m segm.train` in tests: tiny runs on the synthetic fixture (crop 64, one
encoder layer), in process through click's CliRunner."""
import torch
from click.testing import CliRunner

from segm import train as train_mod


def tiny_args(log_dir, root, *extra):
    return ["--log-dir", str(log_dir), "--dataset", "synthetic", "--data-root", str(root),
            "--backbone", "vit_tiny_patch16_384", "--encoder-layers", "1", "--decoder-layers", "1",
            "--im-size", "64", "--crop-size", "64", "--pretrained", "none", "--num-workers", "0", *extra]


def make_policy_ckpt(path, seed=0):
    """A policy checkpoint with non-trivial BatchNorm statistics."""
    from segm.model.policy import PolicyNet

    torch.manual_seed(seed)
    policy = PolicyNet()
    for m in policy.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(policy.state_dict(), path)
    return policy.state_dict()


def run_cli(args):
    result = CliRunner().invoke(train_mod.main, args, catch_exceptions=False)
    return result


def load_ckpt(log_dir):
    return torch.load(log_dir / "checkpoint.pth", map_location="cpu", weights_only=True)
