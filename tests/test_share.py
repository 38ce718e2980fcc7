"""A trained model shared as one folder (safetensors + config.json + model card) loads back
exactly, without unpickling, into every command that takes a checkpoint."""
import json
from pathlib import Path

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
    assert list(out.glob("scores_ss*.yml"))  # the name of a partial evaluation's file is not this test's


# --------------------------------------------------------------------------- issue 21, part A
def _policy_run_with_paths(tmp_path, data_root):
    """A policy_net run whose variant names the sharer's files: its policy checkpoint, pretrained
    weights, data root and classes file."""
    from segm.model import save_model
    from segm.model.factory import write_variant
    from tests.helpers.models import tiny_variant
    from tests.helpers.train import make_policy_ckpt

    private = tmp_path / "private"
    private.mkdir()
    make_policy_ckpt(private / "model.pth", seed=3)
    variant = tiny_variant(data_root, "policy_net")
    variant["net_kwargs"]["policynet_ckpt"] = str(private / "model.pth")
    variant["dataset_kwargs"]["classes_file"] = str(private / "classes.yml")
    model = segm.create_segmenter(variant["net_kwargs"])
    torch.save(model.encoder.state_dict(), private / "vit.pth")
    variant["net_kwargs"]["pretrained"] = str(private / "vit.pth")
    (tmp_path / "run").mkdir()
    save_model(model, variant, tmp_path / "run" / "checkpoint.pth")
    write_variant(variant, tmp_path / "run")
    return tmp_path / "run" / "checkpoint.pth", model


def test_a_shared_folder_carries_no_path_and_its_policy_network(synthetic_root, tmp_path):
    from safetensors import safe_open

    ckpt, model = _policy_run_with_paths(tmp_path, synthetic_root)
    out = tmp_path / "shared"
    result = CliRunner().invoke(share_main, [str(ckpt), str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for name in ("config.json", "README.md"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text and str(synthetic_root) not in text and "private" not in text, name
    net = json.loads((out / "config.json").read_text())["variant"]["net_kwargs"]
    assert "policynet_ckpt" not in net and "pretrained" not in net
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        policy = {k: f.get_tensor(k) for k in f.keys() if k.startswith("policy_net.")}
    own = {f"policy_net.{k}": v for k, v in model.policy_net.state_dict().items()}
    assert policy.keys() == own.keys() and all(torch.equal(policy[k], own[k]) for k in own)
    shared, _ = segm.load_model(out)
    im = torch.randn(2, 3, CROP, CROP)
    with torch.no_grad():
        assert torch.equal(shared(im), model(im))


def _share_killed_after_the_weights(ckpt, out):
    """`segm.share` in a subprocess, SIGKILLed once the weights are written (both the former
    in-folder temp files and the temporary sibling folder of today are then left over)."""
    import os
    import signal
    import subprocess
    import sys

    code = ("import os, signal, sys\n"
            "import segm.model.hub as hub\n"
            "import segm.utils.atomic as atomic\n"
            "def die(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "hub.atomic_write_text = die\n"  # the former writer: weights, then config
            "real = getattr(hub, '_write_file', None)\n"
            "def write_then_die(path, data):\n"
            "    real(path, data)\n"
            "    die()\n"
            "if real is not None:\n"
            "    hub._write_file = write_then_die\n"
            "from segm.share import main\n"
            "main([sys.argv[1], sys.argv[2]])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ckpt), str(out)], capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def test_a_share_killed_midway_leaves_nothing_that_blocks_or_is_published(synthetic_root, tmp_path):
    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root)
    out = tmp_path / "shared"
    _share_killed_after_the_weights(ckpt, out)
    assert not out.exists() or not any(out.iterdir())  # nothing half-written to upload
    result = CliRunner().invoke(share_main, [str(ckpt), str(out)])
    assert result.exit_code == 0, result.output  # the re-run is not blocked
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".shared")]
    assert leftovers  # the killed share's sibling, until --overwrite
    result = CliRunner().invoke(share_main, [str(ckpt), str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".shared")]
    segm.load_model(out)


def test_overwrite_replaces_the_folder_as_a_whole(synthetic_root, tmp_path):
    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root)
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.txt").write_text("stale")
    (out / ".model.safetensors.abc.tmp").write_bytes(b"x" * 100)  # what a killed write left inside
    result = CliRunner().invoke(share_main, [str(ckpt), str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_a_full_disk_while_sharing_is_one_line_and_leaves_nothing(synthetic_root, tmp_path, monkeypatch):
    import errno
    import os

    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root)
    out = tmp_path / "shared"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    result = CliRunner().invoke(share_main, [str(ckpt), str(out)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines == [f"Error: cannot write {out / 'model.safetensors'}: the disk is full (no space left on device)"]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".shared")]


@pytest.mark.parametrize("where, fragment", [("afile/shared", "afile is a file, not a folder"),
                                             ("afile/deeper/shared", "afile is a file, not a folder"),
                                             ("ro/shared", "permission denied")])
def test_sharing_to_a_place_that_cannot_be_written_is_one_line(synthetic_root, tmp_path, monkeypatch, where, fragment):
    import os

    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root)
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: the folder answers as a read-only mount would
        real = os.mkdir

        def mkdir(path, *a, **k):
            if Path(path).parent.resolve() == (tmp_path / "ro").resolve():
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *a, **k)

        monkeypatch.setattr(os, "mkdir", mkdir)
    try:
        result = CliRunner().invoke(share_main, [str(ckpt), str(tmp_path / where)])
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ro", "run"]
    assert not list((tmp_path / "ro").iterdir())


def test_a_failed_rename_keeps_the_former_folder(synthetic_root, tmp_path, monkeypatch):
    import os

    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root)
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    real = os.replace

    def replace(src, dst):
        if Path(dst) == out and ".partial-" in str(src) and not str(src).endswith("/shared"):
            raise OSError(18, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    result = CliRunner().invoke(share_main, [str(ckpt), str(out), "--overwrite"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shared")]


def test_the_shared_folder_takes_the_umask(synthetic_root, tmp_path):
    import os

    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root)
    old = os.umask(0o027)
    try:
        result = CliRunner().invoke(share_main, [str(ckpt), str(tmp_path / "shared")])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o750
