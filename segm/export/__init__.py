"""ONNX export of a Segmenter of any reduction with static token counts that needs no labels,
with a parity check against eager PyTorch. It speaks the reducer interface only
(`Reducer.export_given`, `export_outputs`, `given_from_outputs`; docs/DESIGN.md, "Deployment").

    python -m segm.export runs/NAME/checkpoint.pth model.onnx [--batch-size B | --dynamic-batch]
        [--opset N] [--check/--no-check] [--dataset NAME --data-root DIR]
        [--quantize none|int8 [--max-changed-pixels FRACTION]]

CTS has static token counts (U + S per image), so the whole forward pass, policy network and
top-S selection included, is one static graph. ONNX has no stable sort: the exported selection
counts, for every superpatch, the scores that beat it (`segm.model.reduction.cts.select_shared`), which
breaks ties exactly as eager does (lower raster index first). Modules: `graph` (the traced
module, `export_bytes`), `check` (the parity check), `sidecar` (`OUT.json`, bound to its graph
by its SHA-256), `schema` (the sidecar's checks), `write` (`export_model`, both files written as
one), `quantize` (`--quantize int8`: ONNX Runtime's dynamic quantisation, refused beyond a
share of changed labels), `cli`. Running the result: `segm.onnx_runtime`.
"""
from segm.export.graph import DEFAULT_OPSET, ExportError, ExportedSegmenter, export_bytes
from segm.export.sidecar import read_sidecar, sidecar_path
from segm.export.write import export_model

__all__ = ["DEFAULT_OPSET", "ExportError", "ExportedSegmenter", "export_bytes", "export_model", "read_sidecar",
           "sidecar_path"]
