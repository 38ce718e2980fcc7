"""Nothing is lost: a training process killed with SIGKILL and resumed ends with weights,
optimizer state and log bit-identical to an uninterrupted run (CPU, --deterministic).

The run uses dropout, drop path and the seeded random policy, so the RNG states must be
restored too, and one data-loading worker in the uninterrupted run but none in the killed
one, so augmentations must not depend on the worker."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.train import load_ckpt, run_cli, tiny_args

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def run_args(log_dir, root, workers):
    return tiny_args(
        log_dir, root, "--policy-method", "random", "--num-tokens-shared", "2", "--dropout", "0.1",
        "--drop-path", "0.1", "--batch-size", "2", "--epochs", "2", "--eval-freq", "1", "--ckpt-every", "1",
        "--deterministic", "--num-workers", str(workers),
    )


def checkpoint_iteration(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["iteration"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return -1


def test_sigkill_then_resume_is_bit_identical(synthetic_root, tmp_path):
    killed_dir, reference_dir = tmp_path / "killed", tmp_path / "reference"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "killed.log", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "segm.train", *run_args(killed_dir, synthetic_root, 0)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        # The uninterrupted run, in this process while the other one starts.
        result = run_cli(run_args(reference_dir, synthetic_root, 1))
        assert result.exit_code == 0, result.output

        deadline = time.monotonic() + 240
        while checkpoint_iteration(killed_dir / "checkpoint.pth") < 3:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "the training process made no progress"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = load_ckpt(killed_dir)["train_state"]
    assert state["next_epoch"] == 0 and 3 <= state["next_batch"] < 12  # killed mid-epoch

    result = run_cli(run_args(killed_dir, synthetic_root, 0))
    assert result.exit_code == 0, result.output
    assert f"resumed from {killed_dir / 'checkpoint.pth'}: epoch 0, batch" in result.output

    a, b = load_ckpt(reference_dir), load_ckpt(killed_dir)
    assert a["iteration"] == b["iteration"] == 24
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    assert a["lr_scheduler"] == b["lr_scheduler"]
    assert (reference_dir / "log.txt").read_text() == (killed_dir / "log.txt").read_text()
    assert not list(killed_dir.glob(".*.tmp"))  # a write torn by the kill is cleaned up
