"""Peak memory of one call: CUDA's allocator statistics, or on the CPU a tracker of the tensor
storage created during the call (with the process RSS high-water mark as a rough cross-check)."""
from __future__ import annotations

import gc
from typing import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from segm.bench.settings import BenchConfig
from segm.bench.timing import sync


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage created while active (the CPU analogue of CUDA's
    max_memory_allocated above the starting level). Storages are tracked from the op outputs
    that create them until they die; memory an op uses only internally is not seen."""

    def __init__(self):
        super().__init__()
        self.live: dict = {}
        self.current = self.peak = 0

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[int, int]:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        # Views and in-place results share an input's storage (e.g. a weight's): not new memory.
        inputs = {self._key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = self._key(t)
                if key[1] and key not in self.live and key not in inputs:
                    self.live[key] = (StorageWeakRef(st), key[1])
                    self.current += key[1]
        self.peak = max(self.peak, self.current)
        return out


def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Resets the kernel's RSS high-water mark (VmHWM); Linux only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak_memory(fn: Callable, x, device) -> dict:
    """Peak memory of one call, in MiB, above the level just before it (`delta_mib`).

    CUDA: max_memory_allocated. CPU: tensor storage tracked by `PeakTensorMemory`, plus the
    process RSS high-water-mark growth (`rss_delta_mib`: VmHWM reset through
    /proc/self/clear_refs, else ru_maxrss, which never resets), which misses memory the
    allocator reuses and counts what it caches, so it is only a rough cross-check.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn(x)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"delta_mib": (peak - before) / 2**20, "peak_mib": peak / 2**20,
                "method": "cuda max_memory_allocated"}
    if _reset_rss_peak():
        rss_before = _rss_kib("VmRSS")
        rss = lambda: _rss_kib("VmHWM")  # noqa: E731
    else:
        import resource

        rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
        rss_before = rss()
    with PeakTensorMemory() as tracker:
        fn(x)
    return {"delta_mib": tracker.peak / 2**20, "rss_delta_mib": (rss() - rss_before) / 1024,
            "method": "tensor storage created during the call (dispatch-mode tracker)"}


def variant_memory(cfg: BenchConfig, compiled_fn: Callable, eager_fn: Callable, x, device) -> dict:
    """`measure_peak_memory` of one variant's call, recording whether it ran eager."""
    # The CPU tracker sees eager ops only: compiled variants are measured eager there.
    eager = cfg.compile and device.type == "cpu"
    mem = measure_peak_memory(eager_fn if eager else compiled_fn, x, device)
    return {**mem, "eager": eager or not cfg.compile}
