"""The JSON file beside an exported model (`OUT.json` for `OUT.onnx`): what a deployment needs
to feed the graph and read its outputs, the reduction (`reducer`: `describe_reduction()`), the
evaluation's geometry and classes, and the SHA-256 of the graph it belongs to. It carries no
path of the exporting machine (no checkpoint, data or log folder). Read by `segm.onnx_runtime`
through `read_sidecar`, which checks it (`segm.export.schema`) before anything uses it; no torch
import here."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from segm.export.schema import (BATCH, SidecarError, check_consistency, check_fields, fail, legacy_fields,
                                positive_int)

SIDECAR_FORMAT = "segm-cts-onnx/2"  # /2: bound to its graph by `graph_sha256`, no training variant
INPUT_NAME = "im"  # the graph's one input
MAX_SIDECAR_BYTES = 1 << 22  # a sidecar is a few KB; a larger file is not one

__all__ = ["INPUT_NAME", "SIDECAR_FORMAT", "SidecarError", "build_sidecar", "check_bound", "deployment_variant",
           "graph_digest", "read_sidecar", "reduction_description", "sidecar_path"]


def sidecar_path(onnx_path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def graph_digest(data: bytes | Path) -> str:
    """The SHA-256 (hex) of a graph's bytes, or of the file holding them."""
    if isinstance(data, (bytes, bytearray)):
        return hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    with open(data, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_safe(value):
    """Tuples (variant.yml's `!!python/tuple`) become lists; anything else unknown a string."""
    return json.loads(json.dumps(value, default=str))


def _classes(variant: dict, n_cls: int) -> dict | None:
    """Class names and palette of the checkpoint's dataset, when they can be found and fit."""
    from segm.visualize import checkpoint_classes

    names, palette, note = checkpoint_classes(variant, n_cls)
    return {"names": names, "palette": palette} if note is None else None


def _inference_geometry(variant: dict) -> dict:
    """The evaluation's image size (on the training dataset: the training size, as
    `segm.eval.miou` takes it) and sliding window, from the run's variant (null if unknown)."""
    inf, dkw = variant.get("inference_kwargs") or {}, variant.get("dataset_kwargs") or {}
    given = {"im_size": dkw.get("image_size") or inf.get("im_size"), "window_size": inf.get("window_size"),
             "window_stride": inf.get("window_stride")}
    return {k: (v if positive_int(v) is None else None) for k, v in given.items()}


def build_sidecar(model, variant: dict, *, normalization: str, batch_size: int | None, opset: int,
                  outputs: dict, versions: dict, graph: bytes, quantization: dict | None = None) -> dict:
    """The sidecar of `graph`, the serialised export of `model` (a Segmenter) at its crop, for a
    fixed batch or any (None); `outputs`: the graph's, {name: {"shape", "dtype"}} in order
    (`segm.export.graph.output_specs`), the first (`output`) logits or labels. Of the run's
    `variant` it keeps the dataset's name, classes and evaluation geometry: nothing that names a
    place on the exporting machine.
    `quantization`: how the graph was quantised (`segm.export.quantize`), None for fp32.

    `reducer` is the whole `model.describe_reduction()`. `policy`, `num_notshared`,
    `num_shared` and `random_seed` are the reference's CTS fields, kept for older readers and
    read from the same description (`schema.legacy_fields`)."""
    from segm.data.base import STATS

    h, w = model.crop_size
    batch = batch_size if batch_size is not None else BATCH
    reduction = model.describe_reduction()
    dataset = (variant.get("dataset_kwargs") or {}).get("dataset")
    return _json_safe({
        "format": SIDECAR_FORMAT,
        "graph_sha256": graph_digest(graph),
        "n_cls": model.n_cls,
        "classes": _classes(variant, model.n_cls),
        "crop": [h, w],
        "patch_size": model.patch_size,
        "reducer": reduction,
        **legacy_fields(reduction, model.grid[0] * model.grid[1]),
        "normalization": {"name": normalization, **STATS[normalization], "in_graph": False,
                          "formula": "(x / 255 - mean) / std per RGB channel, x in 0..255"},
        "input": {"name": INPUT_NAME, "shape": [batch, 3, h, w], "dtype": "float32", "layout": "NCHW, RGB"},
        "output": next(iter(outputs)),
        "outputs": outputs,
        "batch_size": batch_size,
        "dynamic_batch": batch_size is None,
        "opset": opset,
        "versions": versions,
        "dataset": dataset if isinstance(dataset, str) else None,
        "inference": _inference_geometry(variant),
        "quantization": quantization,
    })


def reduction_description(side: dict) -> dict:
    """The exported model's `describe_reduction()`: the sidecar's `reducer`."""
    return dict(side["reducer"])


def deployment_variant(side: dict) -> dict:
    """What inference reads of a checkpoint's variant, made from the sidecar's own fields: its
    top-level `normalization` is the one used, its classes, dataset and evaluation geometry."""
    inf = side["inference"]
    return {
        "dataset_kwargs": {"dataset": side["dataset"], "normalization": side["normalization"]["name"],
                           "crop_size": side["crop"][0], "image_size": inf["im_size"]},
        "inference_kwargs": {k: v for k, v in inf.items() if v is not None},
        "classes": side["classes"],
    }


def _load_json(path: Path, onnx_path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} beside {onnx_path}: models exported by `python -m segm.export` "
                                "come with it; re-export the checkpoint")
    size = path.stat().st_size
    if size > MAX_SIDECAR_BYTES:
        raise SidecarError(f"{path} is not a segm.export sidecar ({size} bytes; a sidecar has a few thousand)")
    try:
        data = json.loads(path.read_bytes(), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise SidecarError(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise SidecarError(f"{path} is not a segm.export sidecar (nested too deeply)") from None
    if not isinstance(data, dict) or "format" not in data:
        raise SidecarError(f"{path} is not a segm.export sidecar (no field format)")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_sidecar(onnx_path) -> dict:
    """The sidecar of `onnx_path`, its fields checked alone and against each other (one line
    naming the file and the field on failure). Its graph is checked by `check_bound`."""
    path = sidecar_path(onnx_path)
    data = _load_json(path, onnx_path)
    if data["format"] != SIDECAR_FORMAT:
        raise fail(path, "format", f"is {json.dumps(data['format'])[:40]}, not {SIDECAR_FORMAT!r}: written by "
                   "another version of segm.export; re-export the checkpoint")
    check_fields(data, path)
    check_consistency(data, path)
    return data


def check_bound(side: dict, onnx_path) -> None:
    """Refuses a sidecar that was not written for the graph in `onnx_path` (its bytes' digest):
    a re-export interrupted between its two files, or files of two exports side by side."""
    digest = graph_digest(Path(onnx_path))
    if side["graph_sha256"] != digest:
        raise fail(sidecar_path(onnx_path), "graph_sha256", f"is {side['graph_sha256'][:12]}…, but "
                   f"{Path(onnx_path).name} has {digest[:12]}…: the two files are not from the same export; "
                   "re-export the checkpoint")
