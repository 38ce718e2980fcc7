"""From a loaded model to `OUT.onnx` + `OUT.json`: export, parity check, one atomic write of both."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from segm.export.check import check_inputs, format_check, run_check
from segm.export.graph import ExportError, check_exportable, check_output, export_bytes, output_specs
from segm.export.quantize import MAX_CHANGED_PIXELS, check_quantize, format_quantization, quantized_graph
from segm.export.schema import LOGITS
from segm.export.sidecar import build_sidecar, sidecar_path
from segm.model.segmenter import Segmenter
from segm.utils.atomic import atomic_write_all, remove_stale_temps
from segm.utils.writable import check_writable


def check_output_path(out) -> Path:
    """`out` (.onnx) and its sidecar can be written: checked before any export work."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"the output {out} must end in .onnx (its sidecar is written beside it as "
                          f"{sidecar_path(out).name})")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {out}: folder {out.parent} does not exist")
    for path in (out, sidecar_path(out)):
        if path.is_dir():
            raise ExportError(f"the output {path} is a folder")
    check_writable(out.parent, f"cannot write {out}: its folder", fix="choose an output folder you can write to")
    return out


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def write_export(out: Path, graph: bytes, side: dict) -> None:
    """Writes `graph` to `out` and `side` (built for these bytes: `graph_sha256`) to its
    sidecar, as one: both are complete in temporary files before either is renamed, the
    sidecar last, so an interrupted write leaves either the old pair, or a new graph that its
    old sidecar's digest refuses. Temporary files of earlier interrupted exports go first."""
    side_path = sidecar_path(out)
    for path in (out, side_path):
        remove_stale_temps(path)
    atomic_write_all([(out, lambda f: f.write(graph), True),
                      (side_path, lambda f: f.write(json.dumps(side, indent=1) + "\n"), False)])


def export_model(model: Segmenter, variant: dict, out, *, normalization: str, batch_size: int | None,
                 opset: int, check: bool = True, real: torch.Tensor | None = None, output: str = LOGITS,
                 quantize: str = "none", max_changed_pixels: float = MAX_CHANGED_PIXELS,
                 log: Callable[[str], None] = lambda s: None) -> dict:
    """Exports `model` (CPU, fp32, eval mode) to `out` (.onnx) and its sidecar (.json); returns
    the sidecar; its first output `output`: logits, or labels (`Segmenter.forward_labels`). With
    `check`, the parity check runs first and a failure writes nothing. With
    `quantize` "int8", the checked fp32 graph is quantised (`segm.export.quantize`) and refused
    when it changes more than `max_changed_pixels` of the labels on the check's inputs (compared
    whether or not `check` is on); `parity` is then the fp32 graph's."""
    import onnxruntime as ort

    out = check_output_path(out)
    check_exportable(model, batch_size)
    check_output(output)
    check_quantize(quantize, max_changed_pixels)
    model = model.float().cpu().eval()
    log(f"exporting {model.reducer.summary()} at {model.crop_size[0]}×{model.crop_size[1]}, "
        f"batch {batch_size if batch_size is not None else 'dynamic'}, opset {opset}")
    outputs = output_specs(model, batch_size, output)
    data = export_bytes(model, batch_size=batch_size, opset=opset, output=output)
    inputs = check_inputs(model, [batch_size] if batch_size is not None else [1, 3], real)
    parity = quantization = None
    if check:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        parity = run_check(session, model, inputs)
        log(format_check(parity, list(outputs)[1:]))
    if quantize == "int8":
        data, quantization = quantized_graph(data, model, inputs, max_changed_pixels)
        log(format_quantization(quantization))
    side = build_sidecar(model, variant, normalization=normalization, batch_size=batch_size, opset=opset,
                         outputs=outputs, versions=_versions(), graph=data, quantization=quantization)
    if parity is not None:
        side["parity"] = parity
    write_export(out, data, side)
    return side
