"""`segm.export --quantize int8`: ONNX Runtime's dynamic quantisation of the exported fp32 graph,
refused when it changes more than `MAX_CHANGED_PIXELS` of the predicted labels.

Quantised: the matrix products of the encoder's and the decoder's weights (`linear_nodes`: the
MatMul/Gemm nodes whose constant operand is one of their 2-D parameters) — int8 weights, uint8
activations quantised per call (`DynamicQuantizeLinear`). Not quantised: the bilinear upsampling's
matrix products (`segm.export.ops`: their constants are interpolation weights, which the search
by value does not find), the patch embedding and the policy network (convolutions).

The parity of a quantised graph is the share of pixels whose label (argmax over classes, the
lower class first on ties, as torch, numpy and ONNX agree) the fp32 graph's and the int8 graph's
outputs give alike, pooled over the check's inputs (`pixel_agreement`).
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np

from segm.export.graph import ExportError
from segm.export.sidecar import INPUT_NAME

QUANTIZATIONS = ("none", "int8")
# The share of pixels whose label an int8 graph may change against its fp32 graph.
MAX_CHANGED_PIXELS = 0.02
# Per-channel weight scales (one per output feature) spare a layer's small output features from
# a scale set by its largest. reduce_range (7-bit weights) avoids the overflow of VPMADDUBSW,
# ONNX Runtime's u8s8 kernel on AVX2/AVX-512 CPUs without VNNI, where two u8×s8 products summed
# into int16 saturate: a graph exported once runs on any x86 CPU. On the demo's ViT-Tiny +
# mask transformer (128 px, 59 matrix products; this CPU has VNNI), labels as fp32's on the check's
# inputs and 8 validation crops, pooled (worst input): per-tensor 99.75 % (99.01), + reduce_range
# 99.53 % (97.94); per-channel 99.84 % (99.29), + reduce_range 99.71 % (98.90). Per-channel with
# reduce_range: 0.13 points for correctness on CPUs without VNNI.
PER_CHANNEL = True
REDUCE_RANGE = True
QUANTIZED_OPS = ("MatMul", "Gemm")


def check_quantize(quantize: str, max_changed_pixels: float) -> None:
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if not 0 <= max_changed_pixels <= 1:
        raise ExportError(f"--max-changed-pixels must be a share in 0..1, got {max_changed_pixels:g}")


def _constants(graph) -> dict:
    """{name: array} of the graph's initializers and Constant nodes' values."""
    from onnx import numpy_helper

    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            out[node.output[0]] = node.attribute[0].t
    return {name: numpy_helper.to_array(t) for name, t in out.items()}


def _weight_keys(model) -> set:
    """(shape, bytes) of every 2-D float parameter of the encoder and decoder, in both orientations
    (the exporter writes nn.Linear's weight transposed for MatMul, as it is for Gemm)."""
    keys = set()
    for module in (model.encoder, model.decoder):
        for p in module.parameters():
            if p.ndim == 2:
                w = p.detach().float().cpu().numpy()
                for a in (w, np.ascontiguousarray(w.T)):
                    keys.add((a.shape, a.tobytes()))
    return keys


def linear_nodes(proto, model) -> list[str]:
    """The names of the MatMul/Gemm nodes of `proto` (the exported graph of `model`) that multiply
    by one of the encoder's or decoder's weight matrices."""
    consts = _constants(proto.graph)
    keys = _weight_keys(model)
    names = []
    for node in proto.graph.node:
        if node.op_type not in QUANTIZED_OPS or len(node.input) < 2 or node.input[1] not in consts:
            continue
        w = consts[node.input[1]]
        if w.dtype == np.float32 and (w.shape, np.ascontiguousarray(w).tobytes()) in keys:
            names.append(node.name)
    return names


@contextlib.contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantiser logs a pre-processing suggestion on every call (not applicable:
    the exporter's graph is already shape-inferred and optimised)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(data: bytes, nodes: list[str]) -> bytes:
    """`data` (a serialised fp32 graph) with `nodes` dynamically quantised (int8 weights)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not nodes:
        raise ExportError("--quantize int8 found no matrix product of the encoder's or decoder's weights in the "
                          "graph: export without --quantize")
    with tempfile.TemporaryDirectory(prefix="segm-quantize-") as tmp, _quiet_quantizer():
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(onnx.load_from_string(data), out, nodes_to_quantize=nodes,
                         op_types_to_quantize=list(QUANTIZED_OPS), per_channel=PER_CHANNEL,
                         reduce_range=REDUCE_RANGE, weight_type=QuantType.QInt8)
        return out.read_bytes()


def labels_of(outputs: list) -> np.ndarray:
    """(B, H, W) labels from a graph's outputs: its first output when it holds labels (an integer
    tensor), else the argmax of its logits over classes."""
    first = np.asarray(outputs[0])
    return first if np.issubdtype(first.dtype, np.integer) else first.argmax(1)


def pixel_agreement(reference, quantized, inputs: list[tuple]) -> float:
    """The share of the inputs' pixels whose label the two ONNX Runtime sessions give alike."""
    same = total = 0
    for _, im in inputs:
        feed = {INPUT_NAME: im.numpy()}
        a, b = labels_of(reference.run(None, feed)), labels_of(quantized.run(None, feed))
        same += int((a == b).sum())
        total += a.size
    return same / total


def quantized_graph(data: bytes, model, inputs: list[tuple], max_changed_pixels: float) -> tuple[bytes, dict]:
    """(the int8 graph of `data`, the sidecar's `quantization` record); raises ExportError, one
    line, when it changes the labels of more than `max_changed_pixels` of the inputs' pixels."""
    import onnx
    import onnxruntime as ort

    nodes = linear_nodes(onnx.load_from_string(data), model)
    int8 = quantize_int8(data, nodes)
    sessions = [ort.InferenceSession(d, providers=["CPUExecutionProvider"]) for d in (data, int8)]
    agreement = pixel_agreement(*sessions, inputs)
    if 1 - agreement > max_changed_pixels:
        raise ExportError(f"int8 quantisation changes the label of {100 * (1 - agreement):.2f} % of the check's "
                          f"pixels against the fp32 graph, more than the {100 * max_changed_pixels:g} % allowed "
                          "(--max-changed-pixels): export without --quantize")
    return int8, {"method": "dynamic", "weights": "int8", "activations": "uint8", "per_channel": PER_CHANNEL,
                  "reduce_range": REDUCE_RANGE, "nodes": len(nodes), "pixel_agreement": agreement,
                  "max_changed_pixels": max_changed_pixels}


def format_quantization(q: dict) -> str:
    return (f"int8 (dynamic, {q['nodes']} matrix products): labels of {100 * q['pixel_agreement']:.3f} % of the "
            f"check's pixels as the fp32 graph's (at least {100 * (1 - q['max_changed_pixels']):g} % required)")
