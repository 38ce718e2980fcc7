"""Process-group set-up for torchrun, SLURM (`srun`, one task per GPU) and single runs.

`init_distributed()` reads the launcher's environment, initialises `torch.distributed`
(`nccl` on CUDA, `gloo` on CPU) when there is more than one process, and silences
`print` on non-zero ranks (`print(..., force=True)` still prints). Environment parsing
is kept in pure functions (`dist_env_from_environ`, `expand_hostlist`) so it can be
tested without a process group.
"""
from __future__ import annotations

import builtins
import os
import re
import zlib
from dataclasses import dataclass
from datetime import timedelta
from itertools import product
from typing import Mapping

import torch
import torch.distributed as dist

from segm.utils.device import resolve_device

__all__ = [
    "DistEnv",
    "DistInfo",
    "dist_env_from_environ",
    "expand_hostlist",
    "first_host",
    "slurm_port",
    "init_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "all_reduce_sum",
    "cleanup",
    "silence_print",
]

# Deterministic SLURM port range: below Linux's default ephemeral range (32768-60999).
_PORT_BASE, _PORT_SPAN = 10000, 20000


@dataclass(frozen=True)
class DistEnv:
    """What the launcher says, before any process group exists."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # 'torchrun' | 'slurm' | 'single'


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool


def _int_env(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def _expand_ranges(spec: str, hostlist: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding taken from the range start)."""
    out = []
    for part in spec.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"malformed SLURM hostlist {hostlist!r}: bad range {part!r}")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"malformed SLURM hostlist {hostlist!r}: descending range {part!r}")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def _split_top_level(hostlist: str) -> list[str]:
    """Split on commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(hostlist):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"malformed SLURM hostlist {hostlist!r}: nested brackets")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"malformed SLURM hostlist {hostlist!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"malformed SLURM hostlist {hostlist!r}: unbalanced '['")
    items.append(hostlist[start:])
    return [item.strip() for item in items if item.strip()]


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a compressed SLURM host list, e.g. 'node[01-02,07],gpu3' ->
    ['node01', 'node02', 'node07', 'gpu3']. Several bracket groups in one name
    ('r[1-2]n[1-2]') expand as a product, as `scontrol show hostnames` does."""
    hosts = []
    for item in _split_top_level(hostlist):
        literals = _BRACKET.split(item)  # alternates literal, range spec, literal, ...
        pieces = [
            [text] if i % 2 == 0 else _expand_ranges(text, hostlist) for i, text in enumerate(literals)
        ]
        hosts.extend("".join(p) for p in product(*pieces))
    if not hosts:
        raise ValueError(f"empty SLURM hostlist {hostlist!r}")
    return hosts


def first_host(hostlist: str) -> str:
    return expand_hostlist(hostlist)[0]


def slurm_port(job_id: str) -> int:
    """A port that every rank of a SLURM job derives identically from SLURM_JOB_ID."""
    key = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return _PORT_BASE + key % _PORT_SPAN


def dist_env_from_environ(env: Mapping[str, str] | None = None) -> DistEnv:
    """Launcher settings from torchrun variables first, then SLURM ones, else a single process.

    torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
    SLURM: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the address is the first host of
    SLURM_JOB_NODELIST and the port derives from SLURM_JOB_ID; MASTER_ADDR / MASTER_PORT
    override both. In an sbatch script, start one task per GPU with `srun`: a plain
    `python` there sees SLURM_NTASKS tasks but is only one of them.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        local_rank = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        if world > 1:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
            if missing:
                raise ValueError(
                    f"RANK and WORLD_SIZE are set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                    f"not: launch several processes with `torchrun --nproc_per_node {world} -m ...`, export "
                    f"{' and '.join(missing)}, or unset RANK and WORLD_SIZE to run one process"
                )
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS")
        local_rank = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif env.get("SLURM_JOB_NODELIST"):
            addr = first_host(env["SLURM_JOB_NODELIST"])
        else:
            addr = "127.0.0.1"
        if "MASTER_PORT" in env:
            port = _int_env(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            port = slurm_port(env["SLURM_JOB_ID"])
        elif world > 1:
            raise ValueError("SLURM_JOB_ID is not set: export MASTER_PORT so all ranks agree on a port")
        else:
            port = _PORT_BASE
        launcher = "slurm"
    else:
        return DistEnv(0, 1, 0, "127.0.0.1", _PORT_BASE, "single")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid {launcher} environment: rank {rank} with world size {world}")
    return DistEnv(rank, world, local_rank, addr, port, launcher)


def silence_print(is_main: bool) -> None:
    """Silence `print` on non-main processes; `print(..., force=True)` always prints."""
    builtin_print = getattr(builtins.print, "_segm_original", builtins.print)

    def print(*args, force=False, **kwargs):
        if is_main or force:
            builtin_print(*args, **kwargs)

    print._segm_original = builtin_print
    builtins.print = print


def init_distributed(timeout_min: float = 30.0, device: str | None = "auto") -> DistInfo:
    """Initialise the process group if the launcher started several processes.

    `device` is a `--device` choice (`segm.utils.device.resolve_device`): by default
    `cuda:{local_rank}` when CUDA is available, else the CPU. The backend follows it: `nccl`
    on CUDA, `gloo` on the CPU. Calling it again after initialisation returns the same info.
    """
    env = dist_env_from_environ()
    device = _process_device(device, env.local_rank)
    use_cuda = device.type == "cuda"
    distributed = env.world_size > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=timeout_min),
            device_id=device if use_cuda else None,
        )
        barrier()
        silence_print(env.rank == 0)
    return DistInfo(env.rank, env.world_size, env.local_rank, device, distributed)


def _process_device(name: str | None, local_rank: int) -> torch.device:
    """This process's device, made the current CUDA device when it is one."""
    device = resolve_device(name, local_rank=local_rank)
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():  # `auto` with more processes than GPUs
            raise ValueError(
                f"local rank {local_rank} but only {torch.cuda.device_count()} visible GPU(s): "
                "launch one process per GPU"
            )
        torch.cuda.set_device(device)
    return device


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over all processes; returns the tensor (unchanged when not distributed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    original = getattr(builtins.print, "_segm_original", None)
    if original is not None:
        builtins.print = original
