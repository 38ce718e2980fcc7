"""This process: its device, its place among the launched processes, the numerics settings."""
from __future__ import annotations

import torch
import torch.distributed as dist

from segm.train.options import TrainOptions, user_errors
from segm.utils import host_memory
from segm.utils.determinism import set_numerics
from segm.utils.distributed import DistInfo, init_distributed, silence_print
from segm.utils.threads import apply_threads


def start_process(opts: TrainOptions) -> DistInfo:
    """Joins the process group (when launched as several processes), silences `print` on the
    non-zero ranks (they print only with force=True) and sets the numerics flags."""
    with user_errors():
        info = init_distributed(device=opts.device)  # refuses CUDA without CUDA
    silence_print(info.rank == 0)
    set_numerics(opts.deterministic, info.device)
    use_cpu_plan(opts.threads, info.device.type)
    return info


def use_cpu_plan(threads: int | None, device_type: str) -> None:
    """A trainer's intra-op threads (planned with its workers, `segm.utils.threads.plan_cpu`) and,
    on the CPU, freed memory kept: the step's large buffers are reused, not re-faulted."""
    apply_threads(threads)
    host_memory.for_training(device_type)


def single_process(device: torch.device) -> DistInfo:
    """The place of a trainer that always runs as one process (the policy network's)."""
    return DistInfo(0, 1, 0, device, False)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def distribute(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """The model the training steps call: wrapped in DDP when there are several processes."""
    from torch.nn.parallel import DistributedDataParallel

    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
