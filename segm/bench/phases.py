"""The measured phases: inference (throughput, with the reference matmul in the same rounds,
optional batch-1 latency and peak memory) and the optional training step."""
from __future__ import annotations

import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from segm.bench.flops import count_train_flops
from segm.bench.memory import variant_memory
from segm.bench.settings import BenchConfig
from segm.bench.timing import rate, round_robin, speedups, summary
from segm.bench.variants import BASELINE, Variant, policy_network
from segm.export.schema import LABELS
from segm.utils.amp import AMP_DTYPES, autocast

POLICY_KEY = "policy network"  # the policy network's own calls in the inference rounds


def _autocast(cfg: BenchConfig):
    return autocast(torch.device(cfg.device).type, AMP_DTYPES.get(cfg.dtype))  # fp32: none


def output_fn(cfg: BenchConfig, model) -> Callable:
    """What an inference call of `model` computes: its logits, or with `--output labels` its labels."""
    return model.forward_labels if cfg.output == LABELS else model


def _inference_fn(cfg: BenchConfig, m) -> Callable:
    def fn(x):
        with torch.no_grad(), _autocast(cfg):
            m(x)
    return fn


def _policy_fn(cfg: BenchConfig, scorer) -> Callable:
    """The policy network alone, as the CTS forward runs it in eager mode (scores included)."""
    def fn(x):
        with torch.no_grad(), _autocast(cfg):
            scorer(x, None)
    return fn


def _policy_result(cfg: BenchConfig, scorer, t: list[float], cts_t: list[float]) -> dict:
    from segm.model.policy import onednn_layers

    median = statistics.median(t)
    return {"times_s": t, "ms_per_batch": 1e3 * median, "ms_per_image": 1e3 * median / cfg.batch_size,
            "share_of_cts": median / statistics.median(cts_t), "onednn": onednn_layers(scorer.inference_policy())}


def _matmul_fn(size: int, device) -> tuple[Callable, int]:
    """The fp32 reference matrix product (the compute ceiling), and its products per call."""
    a = torch.randn(size, size, device=device)
    bm = torch.randn(size, size, device=device)
    iters = 20 if device.type == "cuda" else 1

    def matmul(_):
        for _ in range(iters):
            torch.mm(a, bm)
    return matmul, iters


def _inference_row(cfg: BenchConfig, v: Variant, times: dict, mm_rate: float) -> dict:
    t = times[v.name]
    img_s = rate(t, cfg.batch_size)
    achieved = v.counts["gflops"] * img_s["median"]
    return {
        "name": v.name, "policy": v.policy, "num_shared": v.num_shared, "reduction": v.reduction,
        "reducer": v.describe(), "series": v.series, "backend": v.backend, **v.counts,
        "inference": {"times_s": t, "img_s": img_s, **speedups(times[BASELINE], t),
                      "gflop_per_s": achieved, "matmul_fraction": achieved / mm_rate},
    }


def _add_latency(cfg: BenchConfig, fns: dict, batches: list, results: list[dict], device, log: Callable) -> None:
    """Batch-1 latency per variant (the first image of every batch), interleaved."""
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    singles = [x[:1].contiguous(memory_format=fmt) for x in batches]
    lat = round_robin(fns, singles, cfg.warmup, cfg.repeats, device, log, "latency b1")
    for r in results:
        t = lat[r["name"]]
        r["latency_b1"] = {"times_s": t, "ms": {k: 1e3 * s for k, s in summary(t).items()},
                           "speedup": statistics.median(lat[BASELINE]) / statistics.median(t)}


def inference_phase(cfg: BenchConfig, variants: list[Variant], runners: dict, batches: list, device,
                    log: Callable) -> tuple[list[dict], dict, dict | None]:
    """Throughput (and optionally batch-1 latency and peak memory) per variant, with the fp32
    reference matmul and the policy network of the first variant that runs one (the main CTS
    variant) alone, timed in the same rounds.
    Returns (per-variant results, matmul result, policy-network result or None)."""
    n_mm = cfg.matmul_size
    matmul, mm_iters = _matmul_fn(n_mm, device)
    fns = {v.name: _inference_fn(cfg, runners[v.name]) for v in variants}
    references = {"matmul": matmul}
    cts = next((v for v in variants if v.backend == "eager" and not v.sweep and policy_network(v.model)), None)
    if cts is not None:
        references[POLICY_KEY] = _policy_fn(cfg, policy_network(cts.model))
    times = round_robin({**fns, **references}, batches, cfg.warmup, cfg.repeats, device, log, "inference")
    matmul_res = {"size": n_mm, "dtype": "fp32", "iters_per_call": mm_iters,
                  "gflop_per_s": rate(times.pop("matmul"), 2 * n_mm**3 * mm_iters / 1e9)}
    policy = None
    if cts is not None:
        policy = _policy_result(cfg, policy_network(cts.model), times.pop(POLICY_KEY), times[cts.name])
    results = [_inference_row(cfg, v, times, matmul_res["gflop_per_s"]["median"]) for v in variants]
    if cfg.latency:
        _add_latency(cfg, fns, batches, results, device, log)
    if cfg.memory:
        for v, r in zip(variants, results):
            if v.backend != "eager":  # the tracker sees torch tensors only
                continue
            r["inference"]["memory"] = variant_memory(cfg, fns[v.name], _inference_fn(cfg, output_fn(cfg, v.model)),
                                                      batches[0], device)
    return results, matmul_res, policy


def _train_step_fn(cfg: BenchConfig, m, opt: torch.optim.Optimizer) -> Callable:
    def fn(xy):
        x, y = xy
        with _autocast(cfg):
            loss = F.cross_entropy(m(x), y, ignore_index=255)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return fn


def train_phase(cfg: BenchConfig, variants: list[Variant], runners: dict, batches: list, device,
                log: Callable) -> dict:
    """Training step per variant: forward + CE loss on random labels + backward + SGD step.

    One optimizer over the shared encoder/decoder; the policy network stays frozen (eval mode)."""
    base = variants[0].model
    params = [p for p in base.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    labels = [torch.randint(0, base.n_cls, (cfg.batch_size, *base.crop_size), generator=g).to(device)
              for _ in batches]
    pairs = list(zip(batches, labels))

    for v in variants:
        v.model.train()
    train_flops = {v.name: count_train_flops(v.model, batches[0][:1], labels[0][:1]) for v in variants}
    fns = {v.name: _train_step_fn(cfg, runners[v.name], opt) for v in variants}
    times = round_robin(fns, pairs, cfg.warmup, cfg.repeats, device, log, "train step")
    out = {}
    for v in variants:
        t = times[v.name]
        img_s = rate(t, cfg.batch_size)
        out[v.name] = {"times_s": t, "img_s": img_s, "gflops": train_flops[v.name],
                       "gflop_per_s": train_flops[v.name] * img_s["median"], **speedups(times[BASELINE], t)}
        if cfg.memory:
            out[v.name]["memory"] = variant_memory(cfg, fns[v.name], _train_step_fn(cfg, v.model, opt), pairs[0],
                                                   device)
    for v in variants:
        v.model.eval()
    return out
