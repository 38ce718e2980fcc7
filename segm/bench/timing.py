"""Timing: interleaved (round-robin) calls, and the summaries and speed-ups drawn from them."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(fns: dict[str, Callable], inputs: list, warmup: int, repeats: int, device,
                log: Callable = lambda s: None, phase: str = "") -> dict[str, list[float]]:
    """Seconds per call: each repeat calls every fn once on the same input, starting from a
    different fn each repeat (so no fn always runs first or right after another)."""
    names = list(fns)
    for r in range(warmup):
        for name in names:
            fns[name](inputs[r % len(inputs)])
        log(f"[{phase}] warm-up {r + 1}/{warmup}")
    times = {name: [] for name in names}
    for r in range(repeats):
        x = inputs[r % len(inputs)]
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync(device)
            t0 = time.perf_counter()
            fns[name](x)
            sync(device)
            times[name].append(time.perf_counter() - t0)
        log(f"[{phase}] repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    return times


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def rate(times: list[float], per_call: float) -> dict:
    """per_call / time → {median, min, max} (min rate from the slowest call)."""
    return {"median": per_call / statistics.median(times), "min": per_call / max(times),
            "max": per_call / min(times)}


def paired_speedup(base: list[float], other: list[float]) -> float:
    """Median over repeats of base/other, each pair timed in the same round."""
    return statistics.median(b / o for b, o in zip(base, other))


def speedups(ref: list[float], t: list[float]) -> dict:
    return {"speedup": statistics.median(ref) / statistics.median(t),
            "speedup_paired": paired_speedup(ref, t), "speedup_best": min(ref) / min(t)}
