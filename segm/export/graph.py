"""The exported graph: a Segmenter whose superpatch scores the graph computes (policy_net,
content) or holds as a constant (random), traced by `torch.export`, rewritten by
`segm.export.ops` and converted by `torch.onnx.export`. While exporting, `segm.model.cts`
selects without sorting (ONNX has no stable sort), with the same result.

Inputs and outputs (docs/DESIGN.md, "Data flow"; sidecar: `segm.export.sidecar`):
- `im` float32 (B, 3, H, W) at the model's crop, RGB, normalised as training does:
  (x/255 − mean)/std with the checkpoint's statistics. Normalisation is not in the graph, so
  the sliding-window code feeds the ONNX model exactly what it feeds the eager one.
- `logits` float32 (B, K, H, W);
- token-sharing models also return `shared_idx` int64 (B, S), the shared superpatches in raster
  order over the superpatch grid (`TokenLayout.shared_idx`), and `scores` float32 (B, n2), the
  policy's scores the selection was made from.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch import nn

from segm.export.ops import DECOMPOSITIONS
from segm.export.sidecar import INPUT_NAME
from segm.model.segmenter import Segmenter

OUTPUT_NAMES = ("logits", "shared_idx", "scores")
# torch's exporter emits opset 18 and later; ONNX Runtime 1.32 cannot load its opset-26 graphs.
# Default 20: GELU becomes ONNX's Gelu op, which ONNX Runtime runs as one kernel (18 spells it
# Div, Erf, Add, Mul): ViT-S/16 at 512 px ran 4–8 % faster on one CPU thread (BENCHMARKS.md).
MIN_OPSET, MAX_OPSET = 18, 25
DEFAULT_OPSET = 20


class ExportError(ValueError):
    """A model or a setting that cannot be exported, or an export that failed its parity check."""


def random_scores(model: Segmenter, batch_size: int) -> torch.Tensor:
    """The random policy's scores as the eager model draws them on its first CPU forward after
    `reset_random_policy()`: uniform, from a generator seeded with `random_seed`."""
    return model.random_scores(batch_size, torch.Generator().manual_seed(model.random_seed))


def check_exportable(model: Segmenter, batch_size: int | None) -> None:
    if model.needs_labels:
        raise ExportError("the oracle policy selects from ground-truth labels, which a deployed model does not "
                          "have: export a policy_net, content, random or no_sharing model")
    if model.policy_method == "random" and batch_size is None:
        raise ExportError("the random policy's scores are drawn once at export for a fixed batch: give "
                          "--batch-size B instead of --dynamic-batch")


class ExportedSegmenter(nn.Module):
    """`model` as the graph computes it: the returned tensors are `OUTPUT_NAMES`' (logits only
    without sharing). The random policy's scores are drawn once, for a fixed batch."""

    def __init__(self, model: Segmenter, batch_size: int | None):
        super().__init__()
        check_exportable(model, batch_size)
        self.model = model
        if model.policy_method == "random":
            self.register_buffer("fixed_scores", random_scores(model, batch_size))

    def forward(self, im: torch.Tensor):
        m = self.model
        if not m.shares_tokens:
            return m.forward_with_scores(im, None).logits
        if m.policy_method == "random":
            scores = self.fixed_scores
        else:
            scores, _ = m.policy_scores(im, None)
        out = m.forward_with_scores(im, scores)
        return out.logits, out.layout.shared_idx, scores


def output_names(model: Segmenter) -> list[str]:
    return list(OUTPUT_NAMES) if model.shares_tokens else [OUTPUT_NAMES[0]]


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset} is not supported: choose {MIN_OPSET}..{MAX_OPSET} (default "
                          f"{DEFAULT_OPSET}), the opsets torch's exporter writes and ONNX Runtime runs")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's progress lines and its optimiser's notes (e.g. 'Skipping constant folding
    for op TopK') are no news to a user."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_bytes(model: Segmenter, *, batch_size: int | None, opset: int) -> bytes:
    """The serialised ONNX model of `model` (eval mode, CPU, fp32) at its crop size, for a fixed
    batch, or any batch when `batch_size` is None."""
    check_opset(opset)
    graph = ExportedSegmenter(model, batch_size).eval()
    sample = torch.zeros(batch_size or 2, 3, *model.crop_size)
    dynamic = {INPUT_NAME: {0: torch.export.Dim("batch", min=1)}} if batch_size is None else None
    with _quiet_exporter(), torch.no_grad():
        program = torch.export.export(graph, (sample,), dynamic_shapes=dynamic).run_decompositions(DECOMPOSITIONS)
        onnx_program = torch.onnx.export(program, (sample,), None, input_names=[INPUT_NAME],
                                         output_names=output_names(model), opset_version=opset, dynamo=True,
                                         verbose=False)
    return onnx_program.model_proto.SerializeToString()
