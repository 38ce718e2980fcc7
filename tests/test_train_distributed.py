"""Two processes (gloo, CPU, torchrun-style environment) follow the loss curve of one process
with the same global batch, end with the same weights and score the same (distributed
evaluation). A CTS model with the frozen policy net runs under DDP without
find_unused_parameters. No randomness in the model (dropout 0, drop path 0, linear decoder),
so only the data order and augmentation could differ, and they must not."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segm.utils.logger import read_log
from tests.helpers.train import load_ckpt, make_policy_ckpt, run_cli, tiny_args

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_two_processes_match_one_process(synthetic_root, tmp_path):
    make_policy_ckpt(tmp_path / "policy.pth")

    def args(log_dir):
        return tiny_args(
            log_dir, synthetic_root, "--policy-method", "policy_net", "--num-tokens-shared", "2",
            "--policynet-ckpt", str(tmp_path / "policy.pth"), "--dropout", "0", "--drop-path", "0",
            "--batch-size", "4", "--epochs", "1", "-lr", "0.01", "--eval-freq", "1",
            "--decoder", "linear",  # the mask transformer's preset dropout (0.1) draws per rank
        )

    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        out = open(tmp_path / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "segm.train", *args(tmp_path / "two")],
                                       cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT), out))
    try:
        result = run_cli(args(tmp_path / "one"))  # meanwhile, one process in this one
        assert result.exit_code == 0, result.output
        for proc, out in procs:
            proc.wait(timeout=300)
            out.close()
    finally:
        for proc, out in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, (tmp_path / f"rank{rank}.log").read_text()

    one, two = tmp_path / "one", tmp_path / "two"
    loss_one, loss_two = scalars(one, "train/loss"), scalars(two, "train/loss")
    assert [s for s, _ in loss_one] == [s for s, _ in loss_two] == list(range(1, 7))
    for (_, a), (_, b) in zip(loss_one, loss_two):
        assert abs(a - b) < 1e-5, (loss_one, loss_two)
    assert len({round(v, 3) for _, v in loss_one}) > 1  # the curve moves

    a, b = load_ckpt(one), load_ckpt(two)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-5, msg=k)
    rec_one, rec_two = read_log(one / "log.txt")[-1], read_log(two / "log.txt")[-1]
    assert rec_one["train_loss"] == pytest.approx(rec_two["train_loss"], abs=1e-5)
    for key in ("val_pixel_accuracy", "val_mean_accuracy", "val_mean_iou"):
        assert rec_one[key] == pytest.approx(rec_two[key], abs=0.05), key
    variant = (two / "variant.yml").read_text()
    assert "world_size: 2" in variant and "batch_size: 2" in variant  # 4 split over 2 ranks
    assert not list(two.glob("*rank*"))  # only rank 0 writes
