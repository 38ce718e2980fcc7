"""Bad input to any command ends with one line naming the problem, never a traceback, and
changes nothing on disk: a table over every command line (in process, through click's
CliRunner), plus the failures that need a run to fail in the middle (a full disk while
checkpointing, an unreadable image in a folder)."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tests.helpers.models import make_model_dir
from tests.helpers.train import make_policy_ckpt, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")

NO_CUDA = not torch.cuda.is_available()
CORRUPT = "is corrupt or not a torch checkpoint"


def _commands() -> dict:
    from policynet import eval as pn_eval, train as pn_train
    from segm.bench.cli import main as bench
    from segm.eval.miou import main as miou
    from segm.inference import main as inference
    from segm.scripts import prepare_ade20k, prepare_cityscapes, prepare_synthetic
    from segm.train.cli import main as train

    return {"train": train, "miou": miou, "inference": inference, "bench": bench, "pn_train": pn_train.main,
            "pn_eval": pn_eval.main, "prep_ade20k": prepare_ade20k.main, "prep_cityscapes": prepare_cityscapes.main,
            "prep_synthetic": prepare_synthetic.main}


class _Evil:
    """Unpickling it would call a function: a checkpoint holding it must be refused unread."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.fixture(scope="module")
def world(synthetic_root, tmp_path_factory):
    """Every file the bad inputs name: a tiny checkpoint, corrupt and malicious copies, a policy
    whose config.json is unreadable, a corrupt .safetensors, a plain file, read-only folders."""
    w = tmp_path_factory.mktemp("bad_inputs")
    ckpt, _, _ = make_model_dir(w, synthetic_root)
    truncated = ckpt.read_bytes()[: ckpt.stat().st_size // 2]
    for name, write in (("corrupt", lambda p: p.write_bytes(truncated)),
                        ("evil", lambda p: torch.save({"model": _Evil()}, p))):
        (w / name).mkdir()
        shutil.copy(ckpt.parent / "variant.yml", w / name)
        write(w / name / "checkpoint.pth")
    (w / "policy").mkdir()
    make_policy_ckpt(w / "policy" / "model.pth")
    (w / "policy" / "config.json").write_text("{not json")
    (w / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    (w / "afile").write_text("a file, not a folder")
    (w / "bad.png").write_bytes(b"not an image")
    (w / "images").mkdir()
    shutil.copy(next((synthetic_root / "images" / "validation").iterdir()), w / "images")
    shutil.copytree(ckpt.parent, w / "ro_run")
    (w / "ro").mkdir()
    for folder in (w / "ro", w / "ro_run"):
        folder.chmod(0o555)
    yield w
    for folder in (w / "ro", w / "ro_run"):
        folder.chmod(0o755)


@pytest.fixture
def read_only(world, monkeypatch):
    """`ro` and `ro_run` are read-only (0o555). Root ignores permission bits, so for root
    `os.access` answers about them as it does for anyone else (or on a read-only mount)."""
    if os.geteuid() == 0:
        real_access = os.access
        frozen = [(world / "ro").resolve(), (world / "ro_run").resolve()]

        def access(path, mode, *args, **kwargs):
            if mode & os.W_OK and any(Path(path).resolve().is_relative_to(f) for f in frozen):
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)


@dataclass(frozen=True)
class Case:
    id: str
    command: str
    args: tuple
    fragment: str
    env: tuple = ()
    needs_no_cuda: bool = False


def _train(*extra):
    return ("--log-dir", "{w}/run_new", *tiny_args("X", "{root}", "--policy-method", "no_sharing", *extra)[2:])


CASES = [
    # segm.train
    Case("train-unknown-option", "train", _train("--no-such-option"), "No such option"),
    Case("train-token-numbers", "train", _train("--policy-method", "random", "--num-tokens-shared", "2",
                                                "--num-tokens-notshared", "9"), "U must be N − 4S = 8"),
    Case("train-crop", "train", _train("--policy-method", "random", "--num-tokens-shared", "1", "--crop-size", "48"),
         "multiple of 32"),
    Case("train-missing-dataset", "train", _train("--data-root", "{w}/nowhere"), "not found"),
    Case("train-lr-nan", "train", _train("-lr", "nan"), "--learning-rate must be a positive finite number"),
    Case("train-image-size", "train", _train("--im-size", "0"), "--im-size must be positive"),
    Case("train-crop-huge", "train", _train("--crop-size", "65536"), "--crop-size must be at most 8192 pixels"),
    Case("train-policy-combination", "train", _train("--num-tokens-shared", "3"),
         "policy 'no_sharing' shares no tokens"),
    Case("train-corrupt-safetensors", "train", _train("--pretrained", "{w}/w.safetensors"),
         "cannot read pretrained weights"),
    Case("train-policy-config-unreadable", "train", _train("--policy-method", "policy_net", "--num-tokens-shared", "2",
                                                           "--policynet-ckpt", "{w}/policy/model.pth"),
         "config.json"),
    Case("train-log-dir-read-only", "train", ("--log-dir", "{w}/ro/run", *_train()[2:]), "cannot write to"),
    Case("train-log-dir-under-a-file", "train", ("--log-dir", "{w}/afile/run", *_train()[2:]),
         "is a file, not a folder"),
    Case("train-unknown-device", "train", _train("--device", "tpu"), "'tpu' is not one of"),
    Case("train-cuda-without-cuda", "train", _train("--device", "cuda"), "no CUDA device is available",
         needs_no_cuda=True),
    Case("train-rank-without-master", "train", _train(), "MASTER_ADDR and MASTER_PORT are not",
         env=(("RANK", "0"), ("WORLD_SIZE", "2"))),
    # segm.eval.miou
    Case("miou-unknown-option", "miou", ("{w}/run/checkpoint.pth", "synthetic", "--bogus"), "No such option"),
    Case("miou-missing-checkpoint", "miou", ("{w}/nope/checkpoint.pth", "synthetic"), "checkpoint not found"),
    Case("miou-corrupt-checkpoint", "miou", ("{w}/corrupt/checkpoint.pth", "synthetic"), CORRUPT),
    Case("miou-malicious-pickle", "miou", ("{w}/evil/checkpoint.pth", "synthetic"), "not allowed"),
    Case("miou-unknown-device", "miou", ("{w}/run/checkpoint.pth", "synthetic", "--device", "tpu"),
         "unknown device 'tpu'"),
    Case("miou-cuda-without-cuda", "miou", ("{w}/run/checkpoint.pth", "synthetic", "--device", "cuda"),
         "no CUDA device is available", needs_no_cuda=True),
    Case("miou-read-only-run", "miou", ("{w}/ro_run/checkpoint.pth", "synthetic", "--num-workers", "0"),
         "cannot write to"),
    Case("miou-missing-dataset", "miou", ("{w}/run/checkpoint.pth", "synthetic", "--data-root", "{w}/nowhere"),
         "not found"),
    Case("miou-image-size", "miou", ("{w}/run/checkpoint.pth", "synthetic", "--im-size", "0"),
         "--im-size must be positive"),
    Case("miou-window-size", "miou", ("{w}/run/checkpoint.pth", "synthetic", "--window-size", "48"), "--window-size"),
    Case("miou-policy-combination", "miou", ("{w}/run/checkpoint.pth", "synthetic", "--num-tokens-shared", "3"),
         "give --policy-method too"),
    # segm.inference
    Case("inference-missing-checkpoint", "inference", ("--model-path", "{w}/nope.pth", "-i", "{w}/images",
                                                       "-o", "{w}/out"), "checkpoint not found"),
    Case("inference-corrupt-checkpoint", "inference", ("--model-path", "{w}/corrupt/checkpoint.pth",
                                                       "-i", "{w}/images", "-o", "{w}/out"), CORRUPT),
    Case("inference-malicious-pickle", "inference", ("--model-path", "{w}/evil/checkpoint.pth", "-i", "{w}/images",
                                                     "-o", "{w}/out"), "not allowed"),
    Case("inference-gpu-without-cuda", "inference", ("--model-path", "{w}/run/checkpoint.pth", "-i", "{w}/images",
                                                     "-o", "{w}/out", "--gpu"), "no CUDA device is available",
         needs_no_cuda=True),
    Case("inference-unknown-device", "inference", ("--model-path", "{w}/run/checkpoint.pth", "-i", "{w}/images",
                                                   "-o", "{w}/out", "--device", "tpu"), "unknown device 'tpu'"),
    Case("inference-read-only-output", "inference", ("--model-path", "{w}/run/checkpoint.pth", "-i", "{w}/images",
                                                     "-o", "{w}/ro/out"), "cannot write to"),
    Case("inference-output-under-a-file", "inference", ("--model-path", "{w}/run/checkpoint.pth",
                                                        "-i", "{w}/images", "-o", "{w}/afile/out"),
         "is a file, not a folder"),
    Case("inference-unreadable-image", "inference", ("--model-path", "{w}/run/checkpoint.pth", "-i", "{w}/bad.png",
                                                     "-o", "{w}/out"), "cannot decode image"),
    # segm.bench
    Case("bench-missing-checkpoint", "bench", ("--model-path", "{w}/nope.pth"), "checkpoint not found"),
    Case("bench-corrupt-checkpoint", "bench", ("--model-path", "{w}/corrupt/checkpoint.pth"), CORRUPT),
    Case("bench-malicious-pickle", "bench", ("--model-path", "{w}/evil/checkpoint.pth"), "not allowed"),
    Case("bench-crop", "bench", ("--crop", "50"), "not a multiple of the patch size 16"),
    Case("bench-unknown-device", "bench", ("--device", "tpu"), "unknown device 'tpu'"),
    Case("bench-cuda-without-cuda", "bench", ("--device", "cuda"), "no CUDA device is available",
         needs_no_cuda=True),
    # policynet
    Case("pn-train-unknown-option", "pn_train", ("--dataset", "synthetic", "--bogus"), "No such option"),
    Case("pn-train-lr-nan", "pn_train", ("--dataset", "synthetic", "--data-root", "{root}", "--logdir", "{w}/plogs",
                                         "--lr", "nan", "--pretrained", "none", "--device", "cpu"),
         "Invalid learning rate: nan"),
    Case("pn-train-missing-dataset", "pn_train", ("--dataset", "synthetic", "--data-root", "{w}/nowhere",
                                                  "--logdir", "{w}/plogs"), "not found"),
    Case("pn-train-cuda-without-cuda", "pn_train", ("--dataset", "synthetic", "--data-root", "{root}",
                                                    "--logdir", "{w}/plogs", "--device", "cuda"),
         "no CUDA device is available", needs_no_cuda=True),
    Case("pn-train-unknown-device", "pn_train", ("--dataset", "synthetic", "--data-root", "{root}",
                                                 "--logdir", "{w}/plogs", "--device", "tpu"), "unknown device 'tpu'"),
    Case("pn-train-read-only-logdir", "pn_train", ("--dataset", "synthetic", "--data-root", "{root}",
                                                   "--logdir", "{w}/ro", "--device", "cpu"), "cannot write to"),
    Case("pn-eval-config-unreadable", "pn_eval", ("{w}/policy/model.pth", "--dataset", "synthetic",
                                                  "--data-root", "{root}"), "config.json"),
    Case("pn-eval-corrupt-checkpoint", "pn_eval", ("{w}/corrupt/checkpoint.pth", "--dataset", "synthetic",
                                                   "--data-root", "{root}"), CORRUPT),
    Case("pn-eval-malicious-pickle", "pn_eval", ("{w}/evil/checkpoint.pth", "--dataset", "synthetic",
                                                 "--data-root", "{root}"), "not allowed"),
    # dataset preparation
    Case("prepare-ade20k-read-only", "prep_ade20k", ("{w}/ro",), "cannot write to"),
    Case("prepare-cityscapes-read-only", "prep_cityscapes", ("{w}/ro",), "cannot write to"),
    Case("prepare-synthetic-read-only", "prep_synthetic", ("{w}/ro",), "cannot write to"),
    Case("prepare-ade20k-under-a-file", "prep_ade20k", ("{w}/afile/datasets",), "is a file, not a folder"),
    Case("prepare-ade20k-wrong-archive", "prep_ade20k", ("{w}/datasets", "--archive", "{w}/bad.png"),
         "unexpected --archive bad.png"),
]


def _snapshot(folder: Path) -> dict:
    """Every entry under `folder`: its mtime and, for files, a digest of the content."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.is_file() and hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*"))}


def _error_lines(result) -> list[str]:
    """The non-empty lines on stderr, less click's usage header of a usage error (exit 2)."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    if result.exit_code == 2:
        lines = [ln for ln in lines if not ln.startswith(("Usage: ", "Try '"))]
    return lines


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_with_one_line(case, world, synthetic_root, read_only, monkeypatch):
    if case.needs_no_cuda and not NO_CUDA:
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(world)  # a stray write to the working folder shows in the snapshot
    monkeypatch.setenv("DATASET", str(world / "datasets"))
    for name, value in case.env:
        monkeypatch.setenv(name, value)
    args = [a.format(w=world, root=synthetic_root) for a in case.args]
    before = _snapshot(world)
    result = CliRunner().invoke(_commands()[case.command], args)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"  # else: a traceback
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert case.fragment in lines[0], lines[0]
    assert "Traceback" not in result.output and "weights_only" not in result.output
    assert _snapshot(world) == before


# ----------------------------------------------------------------------------- failures mid-run
@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """A finished one-iteration run (no sharing) to resume from."""
    from tests.helpers.train import run_cli

    log_dir = tmp_path_factory.mktemp("trained") / "run"
    args = _run_args(log_dir, synthetic_root, "1")
    assert run_cli(args).exit_code == 0
    return log_dir


def _run_args(log_dir, root, iterations):
    return tiny_args(log_dir, root, "--policy-method", "no_sharing", "--batch-size", "2", "--iterations", iterations,
                     "--eval-freq", "0")


def _torch_zip_write_fails(obj, f, *args, **kwargs):
    """What torch.save does when the disk fills up: a partial write, then torch's RuntimeError
    raised while handling the OSError."""
    f.write(b"PK\x03\x04 partial")
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


def _file_write_fails(obj, f, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("save", [_torch_zip_write_fails, _file_write_fails])
def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(save, trained, synthetic_root, tmp_path,
                                                                 monkeypatch):
    log_dir = tmp_path / "run"
    shutil.copytree(trained, log_dir)
    before = (log_dir / "checkpoint.pth").read_bytes()
    monkeypatch.setattr(torch, "save", save)
    result = CliRunner().invoke(_commands()["train"], [*_run_args(log_dir, synthetic_root, "2"), "--resume"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [ln for ln in result.stderr.splitlines() if "Error" in ln or "Traceback" in ln]
    assert len(errors) == 1 and errors[0].startswith("Error: "), result.stderr
    ckpt = log_dir / "checkpoint.pth"
    assert f"cannot write {ckpt}: the disk is full" in errors[0]
    assert f"The last good checkpoint is {ckpt} (iteration 1), intact" in errors[0]
    assert ckpt.read_bytes() == before and not list(log_dir.glob("*.tmp")) and not list(log_dir.glob(".*.tmp"))


def test_full_disk_while_writing_the_log_is_one_line(trained, synthetic_root, tmp_path, monkeypatch):
    log_dir = tmp_path / "run"
    shutil.copytree(trained, log_dir)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the first file written: variant.yml
    result = CliRunner().invoke(_commands()["train"], [*_run_args(log_dir, synthetic_root, "2"), "--resume"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert _error_lines(result)[-1] == (f"Error: cannot write {log_dir / 'variant.yml'}: the disk is full (no space left on device); "
                                        "training stopped (run the command again to resume from the last checkpoint)")


def test_inference_skips_unreadable_images_and_fails_at_the_end(world, tmp_path):
    images = tmp_path / "in"
    shutil.copytree(world / "images", images)
    good = next(images.iterdir()).name
    shutil.copy(world / "images" / good, images / "b_good.png")
    (images / "a_bad.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    result = CliRunner().invoke(_commands()["inference"], ["--model-path", str(world / "run" / "checkpoint.pth"),
                                                           "-i", str(images), "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [ln.strip() for ln in result.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert f"skipped: cannot decode image {images / 'a_bad.png'}: the file is corrupt or not an image" in lines
    assert lines[-1] == "Error: 1 of 3 images could not be read: a_bad.png"
    assert sorted(p.name for p in out.iterdir()) == sorted(["b_good.png", Path(good).stem + ".png"])


def test_scores_file_that_cannot_be_written_is_one_line(world, tmp_path, monkeypatch):
    from segm.eval import miou

    run = tmp_path / "run"
    shutil.copytree(world / "run", run)

    def denied(data, path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(miou, "dump_yaml", denied)
    result = CliRunner().invoke(miou.main, [str(run / "checkpoint.pth"), "synthetic", "--num-workers", "0",
                                            "--frac-dataset", "0.125", "--device", "cpu"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith(("Error", "Traceback"))]
    assert errors == [f"Error: cannot write {run / 'scores_ss_frac0.125.yml'}: permission denied"]


# ----------------------------------------------------------------------------- devices
def test_resolve_device(monkeypatch):
    from segm.utils.device import DeviceError, resolve_device

    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(DeviceError, match="unknown device 'cuda0'"):
        resolve_device("cuda0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    with pytest.raises(DeviceError, match="device 'cuda:0' needs CUDA, but no CUDA device is available"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"only 2 CUDA device\(s\) are visible"):
        resolve_device("cuda:2")
