"""The ONNX sidecar's schema (`OUT.json`, docs/DESIGN.md, "Deployment"): every field's type,
range and meaning (`check_fields`), the fields against each other (`check_consistency`) and
against the graph they describe (`check_graph`). A sidecar may come from a stranger: each
failure is one line naming the file and the field, and nothing else is read from it before
these checks pass. No torch import."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from segm.data.base import DATASET_CHOICES, STATS
from segm.model.reduction.rules import CTS, NO_SHARING, NONE  # no torch
from segm.model.shared_schema import MAX_SIZE  # no torch

BATCH = "batch"  # the batch dimension of a graph exported for any batch
LOGITS = "logits"  # the graph's first output; the reducer's record (`Reducer.export_outputs`) follows
LABELS = "labels"  # the first output instead of the logits (`segm.export --output labels`)
OUTPUT_KINDS = (LOGITS, LABELS)
# The largest evaluation scale (short side) a sidecar may ask for (the datasets use 512-1024):
# the one pixel bound of every size a stranger's file or an option gives.
MAX_IM_SIZE = MAX_SIZE
DTYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
          "int32": "tensor(int32)", "bool": "tensor(bool)"}  # sidecar dtype: ONNX Runtime's type


class SidecarError(ValueError):
    """A sidecar that is malformed, contradicts itself, or does not describe its graph."""


def fail(path, where: str, problem: str) -> SidecarError:
    return SidecarError(f"{path}: field {where} {problem}")


# ------------------------------------------------------------------ value rules
# Each returns None for a good value, else what the value must be.
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A finite float, or an int a float holds exactly (arithmetic with floats cannot overflow)."""
    return isinstance(v, float) and math.isfinite(v) or _is_int(v) and abs(v) <= 2 ** 53


def positive_int(v):
    return None if _is_int(v) and v >= 1 else "a positive integer"


def count(v):
    return None if _is_int(v) and v >= 0 else "an integer ≥ 0"


def text(v):
    return None if isinstance(v, str) and v else "a non-empty string"


def flag(v):
    return None if isinstance(v, bool) else "true or false"


def optional(rule):
    return lambda v: None if v is None or rule(v) is None else f"null or {rule(v)}"


def one_of(choices):
    return lambda v: None if isinstance(v, str) and v in choices else f"one of {', '.join(sorted(choices))}"


def pair(v):
    return None if isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 1 for x in v) else \
        "[height, width], two positive integers"


def sha256(v):
    return None if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) else "64 lowercase hexadecimal digits"


def shape(v):
    first_ok = isinstance(v, list) and v and (v[0] == BATCH or positive_int(v[0]) is None)
    return None if first_ok and all(count(x) is None for x in v[1:]) else \
        f'a list [batch, ...]: batch a positive integer or "{BATCH}", then integers ≥ 0'


def triplet(positive: bool):
    def rule(v):
        ok = isinstance(v, list) and len(v) == 3 and all(_is_number(x) and (x > 0 or not positive) for x in v)
        return None if ok else f"three finite{' positive' if positive else ''} numbers (R, G, B)"
    return rule


def names(v):
    return None if isinstance(v, list) and all(isinstance(x, str) for x in v) else "a list of strings"


def palette(v):
    ok = isinstance(v, list) and all(isinstance(c, list) and len(c) == 3 and all(_is_int(x) and 0 <= x <= 255 for x in c)
                                     for c in v)
    return None if ok else "a list of [R, G, B] colours, integers 0..255"


def string_map(v):
    return None if isinstance(v, dict) and all(isinstance(x, str) for x in v.values()) else \
        "an object of strings"


def an_object(v):
    return None if isinstance(v, dict) else "an object {...}"


def is_false(v):
    return None if v is False else "false (the graph takes normalised images)"


def number(v):
    return None if _is_number(v) else "a finite number"


@dataclass(frozen=True)
class Record:
    """An object's fields: {name: (rule or Record, meaning)}; `open`: other keys allowed."""

    fields: dict
    nullable: bool = False
    open: bool = False
    optional: frozenset = field(default_factory=frozenset)


def im_size(v):
    return None if _is_int(v) and 1 <= v <= MAX_IM_SIZE else f"an integer in 1..{MAX_IM_SIZE}"


def fraction(v):
    return None if _is_number(v) and 0 <= v <= 1 else "a number in 0..1"


PARITY = Record({"inputs": (names, "the inputs compared"), "images": (positive_int, "the images compared"),
                 "max_abs_logit_diff": (optional(number), "the largest logit difference (null: a labels graph)"),
                 "min_argmax_agreement": (fraction, "the smallest share of equal predictions"),
                 "max_score_diff": (number, "the largest score difference"),
                 "near_tie_images": (count, "images whose near-tied scores were ordered differently"),
                 "tolerance": (Record({"logits": (number, "the logits' tolerance"),
                                       "scores": (number, "the scores' tolerance")}), "the tolerances")})
QUANTIZATION = Record({
    "method": (one_of({"dynamic"}), "how activations are quantised"),
    "weights": (one_of({"int8"}), "the weights' type"), "activations": (one_of({"uint8"}), "the activations' type"),
    "per_channel": (flag, "whether weights have a scale per output feature"),
    "reduce_range": (flag, "whether weights use 7 bits"),
    "nodes": (positive_int, "the matrix products quantised"),
    "pixel_agreement": (fraction, "the share of the check's pixels labelled as by the fp32 graph"),
    "max_changed_pixels": (fraction, "the largest share of changed labels the export accepted"),
}, nullable=True)
OUTPUT = Record({"shape": (shape, "the output's shape"), "dtype": (one_of(DTYPES), "the output's type")})
SPEC = Record({
    "format": (text, "the sidecar's format"),
    "graph_sha256": (sha256, "the SHA-256 of the .onnx file's bytes"),
    "n_cls": (positive_int, "the number of classes"),
    "classes": (Record({"names": (optional(names), "the class names"),
                        "palette": (palette, "a colour per class")}, nullable=True), "class names and palette"),
    "crop": (pair, "the input's size"),
    "patch_size": (positive_int, "the patch size"),
    "reducer": (Record({"reducer": (text, "the reducer's name"), "tokens": (positive_int, "the tokens T per image"),
                        "reduction": (number, "1 − T/N")}, open=True), "the token reduction"),
    "policy": (text, "the CTS policy (for older readers)"),
    "num_notshared": (count, "CTS's U (for older readers)"),
    "num_shared": (count, "CTS's S (for older readers)"),
    "random_seed": (optional(count), "the random policy's seed (for older readers)"),
    "normalization": (Record({"name": (one_of(STATS), "the normalisation's name"),
                              "mean": (triplet(False), "the mean of x/255"), "std": (triplet(True), "the std of x/255"),
                              "in_graph": (is_false, "whether the graph normalises"),
                              "formula": (text, "how to normalise")}), "the input normalisation"),
    "input": (Record({"name": (text, "the graph's input name"), "shape": (shape, "[batch, 3, height, width]"),
                      "dtype": (one_of({"float32"}), "the input's type"),
                      "layout": (one_of({"NCHW, RGB"}), "the axes and channel order")}),
              "the graph's input"),
    "outputs": (an_object, "the graph's outputs, in order"),
    "batch_size": (optional(positive_int), "the batch the graph takes (null: any)"),
    "dynamic_batch": (flag, "whether the graph takes any batch"),
    "opset": (positive_int, "the ONNX opset"),
    "versions": (string_map, "the exporting libraries' versions"),
    "dataset": (optional(one_of(DATASET_CHOICES)), "the training dataset"),
    "inference": (Record({"im_size": (optional(im_size), "the short side images are resized to"),
                          "window_size": (optional(positive_int), "the sliding window"),
                          "window_stride": (optional(positive_int), "the sliding window's stride")}),
                  "the evaluation's geometry"),
    "parity": (PARITY, "the parity check's result"),
    "quantization": (QUANTIZATION, "how the graph was quantised (null: fp32)"),
    "output": (one_of(OUTPUT_KINDS), "the graph's first output (missing: logits)"),
}, optional=frozenset({"parity", "quantization", "output"}))


def _show(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _check_record(value, record: Record, where: str, path) -> None:
    if value is None and record.nullable:
        return
    if not isinstance(value, dict):
        raise fail(path, where, f"must be an object {{...}}, got {_show(value)}")
    for key in record.fields:
        if key not in value and key not in record.optional:
            name = f"{where}.{key}" if where else key
            raise fail(path, name, f"({record.fields[key][1]}) is missing: re-export the checkpoint")
    unknown = [k for k in value if k not in record.fields]
    if unknown and not record.open:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise fail(path, name, "is not a field of this format")
    for key, (rule, meaning) in record.fields.items():
        if key not in value:
            continue
        name = f"{where}.{key}" if where else key
        if isinstance(rule, Record):
            _check_record(value[key], rule, name, path)
        elif (expected := rule(value[key])) is not None:
            raise fail(path, name, f"({meaning}) must be {expected}, got {_show(value[key])}")


def check_fields(side: dict, path) -> None:
    """Every field's presence, type and range (`SPEC`); the outputs' entries too."""
    _check_record(side, SPEC, "", path)
    for name, spec in side["outputs"].items():
        _check_record(spec, OUTPUT, f"outputs.{name}", path)


# ------------------------------------------------------------------ fields against each other
def cts_settings(reducer: dict) -> dict | None:
    """CTS's settings in a reduction: the reducer's own, or those of the CTS it is stacked on."""
    if reducer.get("reducer") == CTS:
        return reducer
    nested = reducer.get(CTS)
    return nested if isinstance(nested, dict) else None


def legacy_fields(reducer: dict, n: int) -> dict:
    """The reference's CTS fields (`policy`, `num_notshared`, `num_shared`, `random_seed`) that
    a reduction implies; a reduction that is not CTS shares no superpatches."""
    return {"policy": reducer.get("policy", NO_SHARING), "num_notshared": reducer.get("num_notshared", n),
            "num_shared": reducer.get("num_shared", 0), "random_seed": reducer.get("random_seed")}


def _require(ok: bool, path, where: str, problem: str) -> None:
    if not ok:
        raise fail(path, where, problem)


def _check_geometry(side: dict, path) -> int:
    """Crop, patch, classes and the reduction's counts; returns N, the patches per image."""
    (h, w), p = side["crop"], side["patch_size"]
    _require(h % p == 0 and w % p == 0, path, "crop", f"{side['crop']} is not a multiple of patch_size {p}")
    n = (h // p) * (w // p)
    classes = side["classes"]
    if classes is not None:
        for key in ("names", "palette"):
            got = classes[key]
            _require(got is None or len(got) == side["n_cls"], path, f"classes.{key}",
                     f"has {len(got or ())} entries for n_cls {side['n_cls']} classes")
    red = side["reducer"]
    _require(red["tokens"] <= n, path, "reducer.tokens", f"{red['tokens']} exceeds the {n} patches of the crop")
    _require(red["reducer"] != NONE or red["tokens"] == n, path, "reducer.tokens",
             f"{red['tokens']}: reducer {NONE} keeps all {n} patches")
    _require(abs(red["reduction"] - (1 - red["tokens"] / n)) <= 1e-9, path, "reducer.reduction",
             f"{red['reduction']} is not 1 − tokens/N = {1 - red['tokens'] / n:.6g}")
    for key, implied in legacy_fields(red, n).items():
        _require(side[key] == implied, path, key, f"{_show(side[key])} contradicts reducer (which implies "
                 f"{_show(implied)})")
    return n


def _check_normalization(side: dict, path) -> None:
    norm = side["normalization"]
    stats = STATS[norm["name"]]
    for key in ("mean", "std"):
        _require(all(abs(a - b) <= 1e-6 for a, b in zip(norm[key], stats[key])), path, f"normalization.{key}",
                 f"{norm[key]} is not normalisation {norm['name']!r}'s {list(stats[key])}")


def _check_batch(side: dict, path) -> object:
    """The batch dimension every shape starts with: the batch size, or "batch"."""
    b = side["batch_size"]
    _require(side["dynamic_batch"] == (b is None), path, "dynamic_batch",
             f"{_show(side['dynamic_batch'])} contradicts batch_size {_show(b)}")
    return BATCH if b is None else b


def _check_outputs(side: dict, path, batch, n: int) -> None:
    """Logits (or labels) first, then the reduction's record: CTS's `shared_idx` and `scores`
    exactly when the reduction holds CTS, a reduction-free graph returns logits (labels) alone."""
    outs, (h, w) = side["outputs"], side["crop"]
    names, kind = list(outs), side.get("output", LOGITS)
    _require(names[:1] == [kind], path, "outputs", f"must start with {kind!r} (field output), got {names}")
    want = ([batch, side["n_cls"], h, w], "float32") if kind == LOGITS else ([batch, h, w], "int64")
    _require([outs[kind]["shape"], outs[kind]["dtype"]] == list(want), path, f"outputs.{kind}",
             f"{_show(outs[kind])} is not {want[1]} {want[0]}")
    for name, spec in outs.items():
        _require(spec["shape"][0] == batch, path, f"outputs.{name}.shape", f"does not start with the batch {batch!r}")
    red = side["reducer"]
    where = f"reducer ({red['reducer']})"
    _require(red["reducer"] != NONE or names == [kind], path, "outputs",
             f"{names} contradict {where}: a model without reduction returns {kind} alone")
    cts = cts_settings(red)
    has_record = "shared_idx" in outs or "scores" in outs
    _require(has_record == (cts is not None), path, "outputs", f"{names} contradict {where}: shared_idx and "
             f"scores are CTS's record, {'missing' if cts is not None else 'without CTS in the reduction'}")
    expected = {"shared_idx": [batch, cts.get("num_shared") if cts else None], "scores": [batch, n // 4],
                "token_of_cell": [batch, n]}
    for name, want in expected.items():
        _require(name not in outs or outs[name]["shape"] == want, path, f"outputs.{name}.shape",
                 f"{outs.get(name, {}).get('shape')} is not {want} (the reduction's)")


def check_consistency(side: dict, path) -> None:
    """The fields against each other (after `check_fields`)."""
    n = _check_geometry(side, path)
    _check_normalization(side, path)
    batch = _check_batch(side, path)
    (h, w), inp = side["crop"], side["input"]
    _require(inp["shape"] == [batch, 3, h, w], path, "input.shape",
             f"{inp['shape']} is not [{batch!r}, 3, {h}, {w}] (batch_size, RGB, crop)")
    _check_outputs(side, path, batch, n)
    q = side.get("quantization")
    _require(q is None or 1 - q["pixel_agreement"] <= q["max_changed_pixels"] + 1e-9, path,
             "quantization.pixel_agreement", f"{_show(q and q['pixel_agreement'])} changes more labels than its "
             f"max_changed_pixels {_show(q and q['max_changed_pixels'])}")
    inf = side["inference"]
    window = inf["window_size"]
    _require(window is None or [window, window] == side["crop"], path, "inference.window_size",
             f"{window} is not the graph's input size {side['crop']}")
    _require(inf["window_stride"] is None or inf["window_stride"] <= h, path, "inference.window_stride",
             f"{inf['window_stride']} exceeds the window {h}")


# ------------------------------------------------------------------ the sidecar against its graph
def _same_shape(side_shape: list, graph_shape: list) -> bool:
    """A sidecar's "batch" matches a symbolic dimension; numbers must be equal."""
    if len(side_shape) != len(graph_shape):
        return False
    return all((g is None or isinstance(g, str)) if s == BATCH else s == g for s, g in zip(side_shape, graph_shape))


def check_graph(side: dict, path, graph_name: str, inputs: list, outputs: list) -> None:
    """`inputs`/`outputs`: the graph's, as (name, ONNX Runtime type, shape) in order."""
    inp = side["input"]
    _require(len(inputs) == 1, path, "input", f"describes one input; {graph_name} has {len(inputs)}")
    name, kind, dims = inputs[0]
    _require(inp["name"] == name, path, "input.name", f"{inp['name']!r} is not {graph_name}'s input {name!r}")
    _require(kind == DTYPES[inp["dtype"]] and _same_shape(inp["shape"], dims), path, "input.shape",
             f"{inp['shape']} ({inp['dtype']}) is not {graph_name}'s {dims} ({kind})")
    got = [o[0] for o in outputs]
    _require(list(side["outputs"]) == got, path, "outputs", f"{list(side['outputs'])} are not {graph_name}'s {got}")
    for name, kind, dims in outputs:
        spec = side["outputs"][name]
        _require(kind == DTYPES[spec["dtype"]] and _same_shape(spec["shape"], dims), path, f"outputs.{name}",
                 f"{spec['shape']} ({spec['dtype']}) is not {graph_name}'s {dims} ({kind})")
