"""Keeping freed host memory mapped (glibc), so large CPU tensors are not page-faulted afresh.

glibc serves every allocation above its mmap threshold (at most 32 MiB on 64-bit Linux) with new
pages and returns them to the kernel on free. A segmenter's full-resolution logits (2 × 150 ×
512 × 512 floats = 315 MB per batch of 2) are therefore page-faulted in on every call: about a
tenth of a second per batch on the CPU, paid alike with and without token sharing, and so a
fixed cost that caps the speed-up of sharing (BENCHMARKS.md). `keep_freed_memory` tells glibc to
serve large blocks from its heap and keep freed memory (as jemalloc and tcmalloc, which PyTorch's
CPU tuning guide recommends, do anyway). The process then holds on to its peak memory until it
exits, which is why this is an option, not a default.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["REUSE_MEMORY_HELP", "HostMemoryError", "keep_freed_memory"]

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
