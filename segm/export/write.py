"""From a loaded model to `OUT.onnx` + `OUT.json`: export, parity check, atomic writes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from segm.export.check import check_inputs, format_check, run_check
from segm.export.graph import ExportError, check_exportable, export_bytes, output_specs
from segm.export.sidecar import build_sidecar, sidecar_path
from segm.model.segmenter import Segmenter
from segm.utils.atomic import atomic_write, atomic_write_text


def check_output_path(out) -> Path:
    out = Path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"the output {out} must end in .onnx (its sidecar is written beside it as "
                          f"{sidecar_path(out).name})")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise ExportError(f"the output {out} is a folder")
    return out


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def export_model(model: Segmenter, variant: dict, out, *, normalization: str, batch_size: int | None,
                 opset: int, check: bool = True, real: torch.Tensor | None = None, checkpoint: str = "",
                 log: Callable[[str], None] = lambda s: None) -> dict:
    """Exports `model` (CPU, fp32, eval mode) to `out` (.onnx) and its sidecar (.json); returns
    the sidecar. With `check`, the parity check runs first and a failure writes nothing."""
    import onnxruntime as ort

    out = check_output_path(out)
    check_exportable(model, batch_size)
    model = model.float().cpu().eval()
    log(f"exporting {model.reducer.summary()} at {model.crop_size[0]}×{model.crop_size[1]}, "
        f"batch {batch_size if batch_size is not None else 'dynamic'}, opset {opset}")
    outputs = output_specs(model, batch_size)
    data = export_bytes(model, batch_size=batch_size, opset=opset)
    side = build_sidecar(model, variant, checkpoint=checkpoint, normalization=normalization, batch_size=batch_size,
                         opset=opset, outputs=outputs, versions=_versions())
    if check:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        batches = [batch_size] if batch_size is not None else [1, 3]
        side["parity"] = run_check(session, model, check_inputs(model, batches, real))
        log(format_check(side["parity"], list(outputs)[1:]))
    atomic_write(out, lambda f: f.write(data))
    try:
        atomic_write_text(sidecar_path(out), json.dumps(side, indent=1) + "\n")
    except BaseException:
        out.unlink(missing_ok=True)  # no model without its sidecar
        raise
    return side
