"""The exported graph: a Segmenter whose reducer selects in the graph (CTS's policy_net and
content scores) or from a constant it fixed at export (`Reducer.export_given`: CTS's random
scores), traced by `torch.export`, rewritten by `segm.export.ops` and converted by
`torch.onnx.export`. While exporting, `segm.model.reduction.cts` selects without sorting (ONNX
has no stable sort), with the same result.

Inputs and outputs (docs/DESIGN.md, "Deployment"; sidecar: `segm.export.sidecar`):
- `im` float32 (B, 3, H, W) at the model's crop, RGB, normalised as training does:
  (x/255 − mean)/std with the checkpoint's statistics. Normalisation is not in the graph, so
  the sliding-window code feeds the ONNX model exactly what it feeds the eager one.
- `logits` float32 (B, K, H, W); or, exported with `--output labels`, `labels` int64 (B, H, W):
  the argmax over classes of those logits (the lower class on ties) computed in bands of rows
  with the classes last (`segm.export.ops.labels_as_matmuls`), so that the graph holds no
  (B, K, H, W) tensor;
- then the reducer's record of the batch, `Reducer.export_outputs` (none for plain models).
  CTS: `shared_idx` int64 (B, S), the shared superpatches in raster order over the superpatch
  grid (`TokenLayout.shared_idx`), and `scores` float32 (B, n2), the policy's scores the
  selection was made from.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch import nn

from segm.export.ops import DECOMPOSITIONS, labels_as_matmuls
from segm.export.schema import BATCH, LABELS, LOGITS, OUTPUT_KINDS
from segm.export.sidecar import INPUT_NAME
from segm.model.segmenter import Segmenter

# torch's exporter emits opset 18 and later; ONNX Runtime 1.32 cannot load its opset-26 graphs.
# Default 20: GELU becomes ONNX's Gelu op, which ONNX Runtime runs as one kernel (18 spells it
# Div, Erf, Add, Mul): ViT-S/16 at 512 px ran 4–8 % faster on one CPU thread (BENCHMARKS.md).
MIN_OPSET, MAX_OPSET = 18, 25
DEFAULT_OPSET = 20


class ExportError(ValueError):
    """A model or a setting that cannot be exported, or an export that failed its parity check."""


def check_exportable(model: Segmenter, batch_size: int | None) -> None:
    """Refuses, in one line, a reducer that reads labels, one whose token count depends on the
    image (ONNX shapes are static), and any batch for a reducer that fixes its input for one."""
    reducer = model.reducer
    if model.needs_labels:
        raise ExportError(f"the reduction {reducer.tag()} selects from ground-truth labels, which a deployed model "
                          "does not have: export the checkpoint with another (--policy-method, --reducer)")
    if reducer.static_tokens(model.grid) is None:
        raise ExportError(f"the reduction {reducer.tag()} has no static token count (it depends on the image): "
                          "an ONNX graph needs static shapes")
    if batch_size is None:
        try:
            reducer.export_given(None)
        except ValueError as e:
            raise ExportError(f"{str(e).splitlines()[0]}: give --batch-size B instead of --dynamic-batch") from None


class ExportedSegmenter(nn.Module):
    """`model` as the graph computes it: `logits` (or `labels`, for `output` "labels"), then the
    reducer's `export_outputs` (the forward returns the first alone when there are none). What
    the reducer fixes at export (`export_given`: CTS's random scores, for a fixed batch) is a
    constant of the graph."""

    def __init__(self, model: Segmenter, batch_size: int | None, output: str = LOGITS):
        super().__init__()
        check_exportable(model, batch_size)
        check_output(output)
        self.model = model
        self.output = output
        given = model.reducer.export_given(batch_size)
        if given is not None:
            self.register_buffer("given", given)
        else:
            self.given = None

    def outputs(self, im: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.output == LABELS:
            masks, tmap = self.model.forward_scores(im, given=self.given)
            first = labels_as_matmuls(masks, self.model.patch_size, tuple(im.shape[2:]))
        else:
            out = self.model.forward_all(im, given=self.given)
            first, tmap = out.logits, out.token_map
        extra = self.model.reducer.export_outputs(tmap)
        if self.output in extra:
            raise ExportError(f"the reducer's export_outputs may not be named {self.output!r}")
        return {self.output: first, **extra}

    def forward(self, im: torch.Tensor):
        outs = tuple(self.outputs(im).values())
        return outs[0] if len(outs) == 1 else outs


def check_output(output: str) -> None:
    if output not in OUTPUT_KINDS:
        raise ExportError(f"--output {output!r}: choose one of {', '.join(OUTPUT_KINDS)}")


def output_specs(model: Segmenter, batch_size: int | None, output: str = LOGITS) -> dict[str, dict]:
    """{name: {"shape", "dtype"}} of the graph's outputs, in order, from one eager run at the
    crop; the batch dimension is "batch" for a dynamic batch."""
    graph = ExportedSegmenter(model, batch_size, output).eval()
    with torch.no_grad():
        outs = graph.outputs(torch.zeros(batch_size or 1, 3, *model.crop_size))
    batch = batch_size if batch_size is not None else BATCH
    return {name: {"shape": [batch, *t.shape[1:]], "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in outs.items()}


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


def export_bytes(model: Segmenter, *, batch_size: int | None, opset: int, output: str = LOGITS) -> bytes:
    """The serialised ONNX model of `model` (eval mode, CPU, fp32) at its crop size, for a fixed
    batch, or any batch when `batch_size` is None; its first output `output` (logits or labels)."""
    check_opset(opset)
    graph = ExportedSegmenter(model, batch_size, output).eval()
    sample = torch.zeros(batch_size or 2, 3, *model.crop_size)
    dynamic = {INPUT_NAME: {0: torch.export.Dim("batch", min=1)}} if batch_size is None else None
    with _quiet_exporter(), torch.no_grad():
        names = list(graph.outputs(sample))
        program = torch.export.export(graph, (sample,), dynamic_shapes=dynamic).run_decompositions(DECOMPOSITIONS)
        onnx_program = torch.onnx.export(program, (sample,), None, input_names=[INPUT_NAME],
                                         output_names=names, opset_version=opset, dynamo=True,
                                         verbose=False)
    return _without_debug_info(onnx_program.model_proto).SerializeToString()


def _nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(sub)


def _without_debug_info(proto):
    """`proto` without the exporter's per-node notes (`metadata_props`): their Python stack
    traces name files of the exporting machine, which a published model must not carry."""
    for node in [*_nodes(proto.graph), *(n for f in proto.functions for n in f.node)]:
        del node.metadata_props[:]
    return proto
