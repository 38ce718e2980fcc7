"""`--with-onnxruntime`: every timed variant (sweep points aside) also exported to ONNX and run in
ONNX Runtime, timed in the same interleaved rounds as eager PyTorch on the same batches.

Each variant is exported at the benchmark's batch (`segm.export`, default opset), checked against
eager on the first batch and run in a CPU session with as many intra-op threads as torch uses.
Its idle threads do not spin-wait: with one thread pool per session plus torch's in one process,
spinning pools took the cores from the one running (ViT-S/16 at 512 px: CTS under ONNX Runtime
ran 1.31–1.35× its no_sharing with spinning, 1.41–1.46× without, in alternating runs; BENCHMARKS.md).
The ONNX rows are named `<variant>_ort`; their FLOPs are the eager variant's (the same function).
With `--output labels` the graphs are exported so too (`segm.export --output labels`) and timed
through `OnnxSegmenter.forward_labels`.
With `--onnx-int8`, each variant's graph quantised to int8 (`segm.export --quantize int8`) is timed
too, as `<variant>_ort_int8` (backend `onnxruntime-int8`): the benchmark's weights may be random,
so its share of labels unchanged against the fp32 graph is logged, never refused.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
from pathlib import Path
from typing import Callable

import torch

from segm.bench.settings import BenchConfig, BenchError
from segm.bench.variants import BASELINE, Variant
from segm.export.schema import LABELS

SUFFIX = "_ort"
INT8_SUFFIX = "_ort_int8"


def _ort_variant(cfg: BenchConfig, v: Variant, folder: Path, batch: torch.Tensor, log: Callable,
                 int8: bool = False):
    """(the ONNX variant, its runner): `v` exported to `folder` (its first output `cfg.output`,
    quantised with `int8`), loaded, and checked on `batch` (fp32: against eager)."""
    from segm.export.check import compare, failure
    from segm.export.graph import DEFAULT_OPSET
    from segm.export.write import export_model
    from segm.onnx_runtime import OnnxSegmenter

    suffix = INT8_SUFFIX if int8 else SUFFIX
    out = folder / f"{v.name}{suffix}.onnx"
    # the inputs are normalised already; the sidecar (thrown away with the folder) only records it
    side = export_model(v.model, {}, out, normalization="vit", batch_size=cfg.batch_size, opset=DEFAULT_OPSET,
                        check=False, output=cfg.output, quantize="int8" if int8 else "none", max_changed_pixels=1.0)
    runner = OnnxSegmenter(out, threads=torch.get_num_threads(), spinning=False)
    if int8:
        log(f"{v.name}{suffix}: exported, labels of {100 * side['quantization']['pixel_agreement']:.2f} % of the "
            "check's pixels as the fp32 graph's")
    else:
        parity = compare(v.model, list(runner.run(batch.cpu()).values()), batch.cpu())
        problem = failure(v.name, parity)
        if problem:
            raise BenchError(f"{v.name}: ONNX Runtime against eager: {problem}")
        log(f"{v.name}{suffix}: exported, " + ("labels as eager's" if parity["labels"] else
                                               f"max |Δlogits| {parity['diff']:.2g} against eager"))
    twin = dataclasses.replace(v, name=v.name + suffix, counts=dict(v.counts),
                               backend="onnxruntime-int8" if int8 else "onnxruntime")
    return twin, (runner.forward_labels if cfg.output == LABELS else runner)


def add_onnxruntime(cfg: BenchConfig, variants: list[Variant], runners: dict, batch: torch.Tensor,
                    log: Callable) -> tuple[list[Variant], dict]:
    """The variants and runners to time: the eager ones, then one ONNX Runtime twin per variant
    (then, with `onnx_int8`, one int8 twin per variant)."""
    twins, ort_runners = [], {}
    with tempfile.TemporaryDirectory(prefix="segm-bench-onnx-") as tmp:  # sessions keep their model in memory
        for int8 in (False, True) if cfg.onnx_int8 else (False,):
            for v in variants:
                if v.sweep:  # sweep points: eager only
                    continue
                twin, runner = _ort_variant(cfg, v, Path(tmp), batch, log, int8)
                twins.append(twin)
                ort_runners[twin.name] = runner
    return variants + twins, {**runners, **ort_runners}


def onnx_summary(results: list[dict]) -> dict:
    """CTS speed-ups under ONNX Runtime, and ONNX Runtime against eager, per variant (medians and
    same-round ratios of the same run)."""
    times = {r["name"]: r["inference"]["times_s"] for r in results}

    def ratio(slow: str, fast: str) -> dict:
        a, b = times[slow], times[fast]
        return {"median": statistics.median(a) / statistics.median(b),
                "paired": statistics.median(x / y for x, y in zip(a, b))}

    base = BASELINE + SUFFIX
    ort = [n for n in times if n.endswith(SUFFIX)]
    int8 = [n for n in times if n.endswith(INT8_SUFFIX)]
    summary = {
        "speedup_over_ort_no_sharing": {n: ratio(base, n) for n in ort if n != base},
        "ort_over_eager": {n[:-len(SUFFIX)]: ratio(n[:-len(SUFFIX)], n) for n in ort},
    }
    if int8:
        summary["int8_over_fp32"] = {n[:-len(INT8_SUFFIX)]: ratio(n[:-len(INT8_SUFFIX)] + SUFFIX, n) for n in int8}
    return summary


def onnx_note(summary: dict) -> str:
    import onnxruntime

    cts = "; ".join(f"{n} {r['median']:.2f}× (paired {r['paired']:.2f}×)"
                    for n, r in summary["speedup_over_ort_no_sharing"].items())
    eager = ", ".join(f"{n} {r['median']:.2f}× (paired {r['paired']:.2f}×)" for n, r in summary["ort_over_eager"].items())
    int8 = ", ".join(f"{n} {r['median']:.2f}× (paired {r['paired']:.2f}×)"
                     for n, r in summary.get("int8_over_fp32", {}).items())
    int8 = f"int8 (*{INT8_SUFFIX} rows: dynamic quantisation) over fp32, images/s: {int8}. " if int8 else ""
    return (f"ONNX Runtime {onnxruntime.__version__} (*{SUFFIX} rows; their speed-up column is against eager "
            f"no_sharing): against no_sharing{SUFFIX}: {cts}. ONNX Runtime over eager, images/s: {eager}. "
            f"{int8}Peak memory is not measured for ONNX Runtime (its allocations are not torch tensors); "
            "'% mm' compares with torch's fp32 matmul, which ONNX Runtime's own GEMM can outrun.")
