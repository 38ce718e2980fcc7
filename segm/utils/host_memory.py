"""Keeping freed host memory mapped (glibc), so large CPU tensors are not page-faulted afresh.

glibc serves every allocation above its mmap threshold (at most 32 MiB on 64-bit Linux) with new
pages and returns them to the kernel on free. A segmenter's full-resolution logits (2 × 150 ×
512 × 512 floats = 315 MB per batch of 2) are therefore page-faulted in on every call: about a
tenth of a second per batch on the CPU, paid alike with and without token sharing, and so a
fixed cost that caps the speed-up of sharing (BENCHMARKS.md). `keep_freed_memory` tells glibc to
serve large blocks from its heap and keep freed memory (as jemalloc and tcmalloc, which PyTorch's
CPU tuning guide recommends, do anyway). The process then holds on to its peak memory until it
exits, which is why this is an option of the benchmark, not a default there. A training process
on the CPU keeps it by default (`for_training`): its step reaches the same peak every iteration,
so the memory kept is memory the next step needs again (a ViT-S/16 step at 512 px, 150 classes,
ran 17 % faster, BENCHMARKS.md "Fast where it runs").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["MMAP_THRESHOLD_MAX", "REUSE_MEMORY_HELP", "HostMemoryError", "for_training", "keep_freed_memory"]

# glibc's largest mmap threshold on 64-bit Linux: a block above it always gets fresh pages, faulted in
# on use and unmapped on free; below it, once such a block was freed, the heap serves and reuses it.
MMAP_THRESHOLD_MAX = 32 << 20

REUSE_MEMORY_HELP = (
    "CPU, glibc only: keep freed memory mapped instead of returning it to the kernel, so large "
    "outputs are not page-faulted on every call (faster; the process keeps its peak memory)."
)

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_TOP_PAD = 64 << 20  # grow the heap in steps of 64 MiB


class HostMemoryError(RuntimeError):
    """The C library cannot be told to keep freed memory."""


def keep_freed_memory() -> None:
    """Serves every allocation of this process from glibc's heap from now on and never trims it.

    Raises HostMemoryError on a C library other than glibc (macOS, Windows, musl)."""
    libc_name = platform.libc_ver()[0]
    path = ctypes.util.find_library("c")
    if libc_name != "glibc" or path is None:
        raise HostMemoryError(
            f"--reuse-memory needs glibc (Linux); this Python runs on {libc_name or platform.system()}: "
            "leave the option out, or preload jemalloc/tcmalloc instead"
        )
    libc = ctypes.CDLL(path)
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, _TOP_PAD))
    if not all(libc.mallopt(param, value) == 1 for param, value in settings):
        raise HostMemoryError("--reuse-memory: glibc refused mallopt; leave the option out")


def for_training(device_type: str) -> bool:
    """A CPU training process keeps its freed memory (glibc); elsewhere nothing changes. Returns
    whether it does: on another C library the trainer runs as before (a speed-up missed, not an
    error)."""
    if device_type != "cpu":
        return False
    try:
        keep_freed_memory()
    except HostMemoryError:
        return False
    return True
