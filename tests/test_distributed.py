import builtins
import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from segm.utils import distributed as du
from segm.utils.distributed import dist_env_from_environ, expand_hostlist, first_host, slurm_port


@pytest.mark.parametrize(
    "hostlist, expected",
    [
        ("node01", ["node01"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
        ("a[1-2],b3,c[005-006]", ["a1", "a2", "b3", "c005", "c006"]),
        ("jean-zay-[01-02]-ib", ["jean-zay-01-ib", "jean-zay-02-ib"]),
        ("r[1-2]n[0-1]", ["r1n0", "r1n1", "r2n0", "r2n1"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ],
)
def test_expand_hostlist(hostlist, expected):
    assert expand_hostlist(hostlist) == expected
    assert first_host(hostlist) == expected[0]


@pytest.mark.parametrize("bad", ["node[01-", "node]01[", "node[a-b]", "node[04-01]", "node[[1]]", ""])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="hostlist"):
        expand_hostlist(bad)


def test_single_process_env():
    env = dist_env_from_environ({"PATH": "/bin"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single")


def test_torchrun_env_wins_over_slurm():
    env = dist_env_from_environ(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29411",
         "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    )
    assert env == du.DistEnv(3, 8, 1, "10.0.0.2", 29411, "torchrun")


def test_torchrun_without_master_is_a_clear_error():
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT are not: launch .*torchrun"):
        dist_env_from_environ({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="but MASTER_PORT is not"):
        dist_env_from_environ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x"})


def test_slurm_env():
    base = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "4242"}
    env = dist_env_from_environ(base)
    assert env == du.DistEnv(5, 8, 1, "gpu12", 10000 + 4242 % 20000, "slurm")
    # Every rank of the job derives the same port; another job gets another one.
    other_rank = dist_env_from_environ({**base, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
    assert other_rank.master_port == env.master_port
    assert slurm_port("4243") != env.master_port
    assert 10000 <= slurm_port("987654321") < 30000
    assert slurm_port("abc") == slurm_port("abc")
    # MASTER_ADDR / MASTER_PORT override.
    env = dist_env_from_environ({**base, "MASTER_PORT": "23456", "MASTER_ADDR": "head"})
    assert (env.master_addr, env.master_port) == ("head", 23456)


def test_bad_env_values():
    with pytest.raises(ValueError, match="SLURM_NTASKS='two'"):
        dist_env_from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "two"})
    with pytest.raises(ValueError, match="rank 4 with world size 4"):
        dist_env_from_environ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "x", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="MASTER_PORT"):
        dist_env_from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"})


def test_helpers_without_process_group():
    assert du.get_rank() == 0 and du.get_world_size() == 1 and du.is_main_process()
    du.barrier()
    t = torch.ones(3)
    assert du.all_reduce_sum(t) is t and torch.equal(t, torch.ones(3))


@pytest.fixture
def fake_two_gpus(monkeypatch):
    """CUDA seen as two GPUs, two processes launched: the calls init_distributed makes, recorded."""
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(du.dist, "init_process_group", lambda **kw: calls.setdefault("group", kw))
    monkeypatch.setattr(du, "barrier", lambda: None)
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    yield calls
    du.cleanup()  # the print silencer


def test_init_distributed_follows_the_device_choice(fake_two_gpus):
    """One set-up for every command: the `--device` choice picks the device and the backend."""
    info = du.init_distributed()
    assert info.device == torch.device("cuda", 1) and info.distributed
    assert fake_two_gpus["set_device"] == info.device and fake_two_gpus["group"]["backend"] == "nccl"


def test_init_distributed_on_the_cpu_beside_gpus(fake_two_gpus):
    info = du.init_distributed(device="cpu")
    assert info.device == torch.device("cpu") and (info.rank, info.world_size, info.distributed) == (0, 2, True)
    assert "set_device" not in fake_two_gpus
    assert fake_two_gpus["group"]["backend"] == "gloo" and fake_two_gpus["group"]["device_id"] is None


def test_init_distributed_refuses_more_processes_than_gpus(fake_two_gpus, monkeypatch):
    from segm.utils.device import DeviceError

    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="local rank 2 but only 2 visible GPU"):
        du.init_distributed()
    with pytest.raises(DeviceError, match="unknown device"):
        du.init_distributed(device="tpu")
    assert "group" not in fake_two_gpus


def test_print_silencer(capsys):
    original = builtins.print
    try:
        du.silence_print(False)
        print("hidden")
        print("shown", force=True)
        du.silence_print(True)  # re-silencing wraps the original print, not the wrapper
        print("main")
    finally:
        builtins.print = original
    assert capsys.readouterr().out == "shown\nmain\n"


def _worker(rank, world_size, port, out_dir):
    import os

    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""}
    )
    from segm.metrics import IoUAccumulator
    from segm.utils import distributed as du

    info = du.init_distributed(timeout_min=1)
    try:
        t = torch.tensor([rank + 1.0, 10.0 * rank], dtype=torch.float64)
        du.all_reduce_sum(t)
        acc = IoUAccumulator(3)
        acc.update(torch.tensor([rank, 1]), torch.tensor([rank, 255]))
        acc.all_reduce()
        du.barrier()
        result = {
            "info": [info.rank, info.world_size, info.distributed, str(info.device)],
            "sum": t.tolist(),
            "areas": acc.areas.tolist(),
            "main": du.is_main_process(),
            "backend": torch.distributed.get_backend(),
        }
    finally:
        du.cleanup()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_all_reduce(tmp_path):
    # fork avoids re-importing torch in the children (~0.1 s instead of ~8 s), but is
    # unsafe once CUDA is in use in this process: spawn there.
    method = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method=method)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["info"] == [r, 2, True, "cpu"]
        assert res["backend"] == "gloo"
        assert res["sum"] == [3.0, 10.0]
        # Rank 0 counts class 0 once, rank 1 class 1 once: summed in memory.
        assert res["areas"] == [[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]]
        assert res["main"] == (r == 0)
