"""Determinism for training and resuming: data order, per-sample augmentation seeds, RNG state.

The contract that makes a resumed or multi-process run equal an uninterrupted single-process
one:
- the data order of epoch e is a permutation seeded by (seed + e), the same on every rank
  (`ResumableSampler`, the `DistributedSampler` layout); a resumed epoch skips the batches
  already consumed without loading them;
- every sample's augmentation is drawn from RNGs seeded by (seed, epoch, index) only
  (`SeededDataset`), so it does not depend on the worker, the rank or the world size;
- every process's RNG state (python, numpy, torch, CUDA, a random policy's generators) is
  saved in the checkpoint and restored on resume (`gather_rng_states`, `set_rng_state`).

`set_numerics` sets every flag `--deterministic` stands for, and the TF32 matmuls of CUDA runs.
"""
from __future__ import annotations

import math
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

__all__ = [
    "ResumableSampler",
    "SeededDataset",
    "gather_rng_states",
    "get_rng_state",
    "seed_everything",
    "set_numerics",
    "set_rng_state",
]


# ----------------------------------------------------------------------------- data
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends only on (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SeededDataset(Dataset):
    """Wraps a train dataset; item `(epoch, index)` is `dataset[index]` computed with the
    python, numpy and torch RNGs seeded from (seed, epoch, index). The caller's RNG states are
    restored afterwards, so loading in the main process (num_workers=0) does not disturb the
    training RNG. (The mmseg pipelines draw from numpy's global RNG.)"""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(s)
            np.random.seed(s)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ResumableSampler(Sampler):
    """`DistributedSampler(shuffle=True, seed=seed, drop_last=False)` semantics, yielding
    `(epoch, index)` pairs for `SeededDataset`, with a start offset.

    The permutation of epoch e is `randperm(n, seed + e)`, padded by wrapping around to a
    multiple of the world size; rank r takes positions r, r + world, ... Global batch i
    (the per-rank batches i of all ranks) is then the same set of samples for any world size
    with the same global batch. `set_epoch(e, start)` skips this rank's first `start` items.
    """

    def __init__(self, num_samples: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if num_samples < 1:
            raise ValueError("the training set is empty")
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = int(seed)
        self.per_rank = math.ceil(num_samples / num_replicas)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start {start} outside 0..{self.per_rank}")
        self.epoch, self.start = int(epoch), int(start)

    def indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        total = self.per_rank * self.num_replicas
        order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank : total : self.num_replicas]

    def __iter__(self):
        epoch = self.epoch
        return iter([(epoch, i) for i in self.indices(epoch)[self.start :]])

    def __len__(self) -> int:
        return self.per_rank - self.start


# ----------------------------------------------------------------------------- numerics
def set_numerics(deterministic: bool, device: torch.device) -> None:
    """The numerics flags of a training process on `device`, set once it has its device and
    before its first matrix product (cuBLAS reads its workspace setting when it starts).

    Deterministic: deterministic algorithms (CUDA lacks deterministic kernels for a few ops,
    e.g. the bilinear upsampling backward: those warn; CPU runs are bit-exact), cuBLAS's fixed
    workspace and no cuDNN autotuning. On CUDA, TF32 matmuls, as the reference had them
    (PyTorch < 1.12 enabled them by default).
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = bool(deterministic)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ----------------------------------------------------------------------------- RNG state
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state(device: torch.device | None = None, model: torch.nn.Module | None = None) -> dict:
    """Python, numpy, torch CPU (and the device's CUDA) RNG states, and the generators of a
    Segmenter's `random` policy, as plain tensors and containers (`weights_only=True` loads
    them)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    generators = model.reducer.generators() if hasattr(model, "reducer") else None
    if generators:
        state["policy"] = {str(dev): g.get_state() for dev, g in generators.items()}
    return state


def set_rng_state(state: dict, device: torch.device | None = None, model: torch.nn.Module | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if model is not None and hasattr(model, "reducer"):
        generators = model.reducer.generators()
        generators.clear()
        for dev, g_state in state.get("policy", {}).items():
            g = torch.Generator(device=dev)
            g.set_state(g_state)
            generators[torch.device(dev)] = g


def gather_rng_states(device: torch.device, world_size: int, model: torch.nn.Module | None = None) -> list[dict]:
    """Every rank's RNG state, in rank order (a collective: all ranks must call it)."""
    state = get_rng_state(device, model)
    if world_size == 1:
        return [state]
    out = [None] * world_size
    dist.all_gather_object(out, state)
    return out
