"""This process: its device, its place among the launched processes, the numerics settings."""
from __future__ import annotations

import torch
import torch.distributed as dist

from segm.train.options import TrainOptions, user_errors
from segm.utils.device import resolve_device
from segm.utils.distributed import DistInfo, dist_env_from_environ, init_distributed, silence_print


def start_process(opts: TrainOptions) -> DistInfo:
    """Joins the process group (when launched as several processes), silences `print` on the
    non-zero ranks (they print only with force=True) and sets the numerics flags."""
    with user_errors():
        info = init_device(opts)
    silence_print(info.rank == 0)
    if opts.deterministic:
        # CUDA lacks deterministic kernels for a few ops (bilinear upsampling backward):
        # those warn; CPU runs are bit-exact.
        torch.use_deterministic_algorithms(True, warn_only=info.device.type == "cuda")
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = not opts.deterministic
        torch.backends.cudnn.deterministic = bool(opts.deterministic)
        # TF32 matmuls, as the reference had them (PyTorch < 1.12 enabled them by default).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return info


def init_device(opts: TrainOptions) -> DistInfo:
    env = dist_env_from_environ()
    device = resolve_device(opts.device, local_rank=env.local_rank)  # refuses CUDA without CUDA
    if device.type == "cpu" and torch.cuda.is_available():
        if env.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                    rank=env.rank, world_size=env.world_size)
        return DistInfo(env.rank, env.world_size, env.local_rank, torch.device("cpu"), env.world_size > 1)
    return init_distributed()


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
