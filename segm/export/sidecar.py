"""The JSON file beside an exported model (`OUT.json` for `OUT.onnx`): what a deployment needs
to feed the graph and read its outputs, the reduction (`reducer`: `describe_reduction()`), and
where the model came from. Read by `segm.onnx_runtime`; no torch import here."""
from __future__ import annotations

import json
from pathlib import Path

from segm.model.reduction.rules import CTS, NO_SHARING, NONE  # no torch

SIDECAR_FORMAT = "segm-cts-onnx/1"
INPUT_NAME = "im"  # the graph's one input


def sidecar_path(onnx_path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def _json_safe(value):
    """Tuples (variant.yml's `!!python/tuple`) become lists; anything else unknown a string."""
    return json.loads(json.dumps(value, default=str))


def _classes(variant: dict, n_cls: int) -> dict | None:
    """Class names and palette of the checkpoint's dataset, when they can be found and fit."""
    from segm.visualize import checkpoint_classes

    names, palette, note = checkpoint_classes(variant, n_cls)
    return {"names": names, "palette": palette} if note is None else None


def build_sidecar(model, variant: dict, *, checkpoint: str, normalization: str, batch_size: int | None,
                  opset: int, outputs: dict, versions: dict) -> dict:
    """The sidecar of `model` (a Segmenter) exported at its crop, for a fixed batch or any (None);
    `outputs`: the graph's, {name: {"shape", "dtype"}} in order (`segm.export.graph.output_specs`).

    `reducer` is the whole `model.describe_reduction()`. `policy`, `num_notshared`,
    `num_shared` and `random_seed` are the reference's CTS fields, kept for older readers and
    read from the same description (a reduction that is not CTS shares no superpatches: `no_sharing`)."""
    from segm.data.base import STATS

    h, w = model.crop_size
    batch = batch_size if batch_size is not None else "batch"
    reduction = model.describe_reduction()
    variant = dict(variant, classes=_classes(variant, model.n_cls))
    return _json_safe({
        "format": SIDECAR_FORMAT,
        "checkpoint": checkpoint,
        "n_cls": model.n_cls,
        "classes": variant["classes"],
        "crop": [h, w],
        "patch_size": model.patch_size,
        "reducer": reduction,
        "policy": reduction.get("policy", NO_SHARING),
        "num_notshared": reduction.get("num_notshared", model.grid[0] * model.grid[1]),
        "num_shared": reduction.get("num_shared", 0),
        "random_seed": reduction.get("random_seed"),
        "normalization": {"name": normalization, **STATS[normalization], "in_graph": False,
                          "formula": "(x / 255 - mean) / std per RGB channel, x in 0..255"},
        "input": {"name": INPUT_NAME, "shape": [batch, 3, h, w], "dtype": "float32", "layout": "NCHW, RGB"},
        "outputs": outputs,
        "batch_size": batch_size,
        "dynamic_batch": batch_size is None,
        "opset": opset,
        "versions": versions,
        "variant": variant,
    })


def reduction_description(side: dict) -> dict:
    """The exported model's `describe_reduction()`: the sidecar's `reducer`, or for sidecars
    written before it, the description their CTS fields make."""
    if isinstance(side.get("reducer"), dict):
        return dict(side["reducer"])
    h, w = side["crop"]
    p = int(side["patch_size"])
    n = (h // p) * (w // p)
    if side["policy"] == NO_SHARING:
        return {"reducer": NONE, "tokens": n, "reduction": 0.0}
    u, s = int(side["num_notshared"]), int(side["num_shared"])
    seed = {"random_seed": side["random_seed"]} if side.get("random_seed") is not None else {}
    return {"reducer": CTS, "tokens": u + s, "reduction": 1 - (u + s) / n, "policy": side["policy"],
            "num_shared": s, "num_notshared": u, **seed}


def read_sidecar(onnx_path) -> dict:
    """The sidecar of `onnx_path`, checked for the fields inference relies on."""
    path = sidecar_path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} beside {onnx_path}: models exported by `python -m segm.export` "
                                "come with it; re-export the checkpoint")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{path} is not a segm.export sidecar (format {SIDECAR_FORMAT!r} expected)")
    return data
