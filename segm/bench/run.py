"""The benchmark from settings to results: build the variants, count, measure, describe."""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable

import torch

from segm.bench.flops import count_flops
from segm.bench.inputs import make_batches
from segm.bench.machine import loadavg, machine_info
from segm.bench.onnx import add_onnxruntime, onnx_note, onnx_summary
from segm.bench.phases import inference_phase, output_fn, train_phase
from segm.bench.settings import BenchConfig, check_config
from segm.bench.variants import Variant, build_variants, set_fused_attention
from segm.export.schema import LABELS
from segm.model.labels import SHORTCUT_MIN_CLASSES
from segm.utils.host_memory import keep_freed_memory


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Builds the variants, measures them and returns the results (see `format_table`)."""
    check_config(cfg)
    if cfg.reuse_memory:
        keep_freed_memory()
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _prepare(cfg: BenchConfig, device, log: Callable) -> tuple[list[Variant], dict, list]:
    """The variants on the device, their model description and the input batches."""
    variants, model_info = build_variants(cfg)
    base = variants[0].model
    for v in variants:
        v.model.to(device)
        if cfg.channels_last:
            v.model.to(memory_format=torch.channels_last)
    set_fused_attention(base, cfg.sdpa)  # encoder and decoder are shared by all variants
    batches = make_batches(cfg, base.crop_size, model_info["normalization"], device)
    log(f"{len(variants)} variants: " + "; ".join(f"{v.name}: {v.reducer.summary()}" for v in variants))
    return variants, model_info, batches


def _measure(cfg: BenchConfig, variants: list[Variant], model_info: dict, batches: list, device,
             log: Callable) -> tuple[list[dict], dict, dict | None]:
    """Per-variant results (counts, inference, optional training step), the matmul result and
    the policy network's own time (None without a CTS variant)."""
    n = model_info["num_patches"]
    for v in variants:  # one counted eager fp32 forward per variant, batch 1
        v.counts = count_flops(v, batches[0][:1])
        if v.reduction is None:  # the reducer's token count depends on the input: as measured
            v.reduction = 1 - v.counts["patch_tokens"] / n
    compiled = torch.compile if cfg.compile else (lambda fn: fn)
    runners = {v.name: compiled(output_fn(cfg, v.model)) for v in variants}
    timed = variants
    if cfg.onnxruntime:
        timed, runners = add_onnxruntime(cfg, variants, runners, batches[0], log)
    results, matmul, policy = inference_phase(cfg, timed, runners, batches, device, log)
    for v, r in zip(timed, results):  # CTS's U; N without reduction; None for other reducers
        r["num_notshared"] = v.describe().get("num_notshared", None if v.model.shares_tokens else n)
    if cfg.train_step:
        train = train_phase(cfg, variants, {v.name: compiled(v.model) for v in variants}, batches, device, log)
        for r in results:
            r["train"] = train[r["name"]]
    return results, matmul, policy


def _notes(model_info: dict, device, output: str) -> list[str]:
    notes = [
        "CTS timings include the policy network; random and content policies need none (content scores "
        "come from the image itself).",
        f"policy network weights: {model_info['policy_weights']}",
        "GFLOPs: torch.utils.flop_counter, 2 FLOPs per multiply-add (fvcore/lab numbers are half); "
        "attention counted via timm's explicit path.",
        "speed-up = median(no_sharing time)/median(variant time); paired = median over repeats of "
        "the same-round ratio (robust to load drift); best = fastest/fastest (robust to bursts).",
    ]
    if device.type == "cpu":
        notes.append("CPU peak memory: tensor storage allocated during one call (as CUDA's "
                     "max_memory_allocated), the output included; weights and inputs excluded.")
        if output == LABELS and model_info.get("model_path") is None and model_info["n_cls"] >= SHORTCUT_MIN_CLASSES:
            notes.append("labels of a random-weight model: almost no cell is won outright by one class, so "
                         "every pixel is upsampled and compared (a trained model's labels cost less on the CPU: "
                         "scripts/label_path_timing.py).")
    return notes


def _protocol(cfg: BenchConfig) -> dict:
    return {
        "batch_size": cfg.batch_size, "warmup": cfg.warmup, "repeats": cfg.repeats, "dtype": cfg.dtype,
        "autocast": cfg.dtype == "bf16", "compile": cfg.compile, "fused_attention": cfg.sdpa,
        "channels_last": cfg.channels_last, "inputs": cfg.inputs, "same_image": cfg.same_image,
        "num_batches": cfg.num_batches, "interleaved": True, "policy_net_included": True,
        "grad": "no_grad (inference)", "reuse_memory": cfg.reuse_memory, "output": cfg.output,
    }


def _run(cfg: BenchConfig, log: Callable[[str], None]) -> dict:
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    load_before = loadavg()
    variants, model_info, batches = _prepare(cfg, device, log)
    results, matmul, policy = _measure(cfg, variants, model_info, batches, device, log)
    notes = _notes(model_info, device, cfg.output)
    onnx = onnx_summary(results) if cfg.onnxruntime else None
    if onnx:
        notes.append(onnx_note(onnx))
    return {
        "config": {**asdict(cfg), "sweep": list(cfg.sweep)},
        "model": model_info,
        "machine": machine_info(device),
        "load_average": {"before": load_before, "after": loadavg()},
        "protocol": _protocol(cfg),
        "matmul": matmul,
        "policy_net": policy,
        "variants": results,
        "onnxruntime": onnx,
        "notes": notes,
    }
