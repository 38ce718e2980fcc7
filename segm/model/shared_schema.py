"""The schema of a shared model's `config.json` (`segm.share`): every field's type, range and
meaning, checked once before anything is built, each failure one line naming the file and the
field. A shared folder comes from strangers, so the schema is closed: unknown keys are refused,
and so is any path or model name (`pretrained`, `policynet_ckpt`, data roots): loading follows
nothing outside the folder. No torch import: this is plain Python over the parsed JSON.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

FORMAT = "segm-cts-model/1"
MAX_CONFIG_BYTES = 1 << 20  # a 150-class config.json is about 10 KB
MAX_DEPTH = 8  # config.json nests 5 deep (variant.net_kwargs.reducer.cts)
MAX_SIZE = 8192  # pixels: crops, windows, image sizes
_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,100}(\.[A-Za-z0-9_\-]{1,100})?$")  # no '/', ':' (paths, hub names)
# Keys that hold a path or a model name to fetch: stripped by segm.share, refused here.
PATH_KEYS = ("pretrained", "policynet_ckpt", "data_root", "classes_file", "log_dir")
DATASET_KEYS = ("dataset", "image_size", "crop_size", "normalization")
INFERENCE_KEYS = ("im_size", "window_size", "window_stride")


class SharedFolderError(ValueError):
    """A shared model folder that cannot be loaded as it is: one line naming file and field."""


# --------------------------------------------------------------------------- field checks
# Each returns what is wrong with `v` (None when it is right).
def _int(lo, hi):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {_show(v)}"
        return None if lo <= v <= hi else f"must be in {lo}..{hi}, got {v}"
    return check


def _float(lo, hi, *, open_low=False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number, got {_show(v)}"
        low_ok = v > lo if open_low else v >= lo
        return None if low_ok and v <= hi else f"must be in {'(' if open_low else '['}{lo}, {hi}], got {v}"
    return check


def _bool(v):
    return None if isinstance(v, bool) else f"must be true or false, got {_show(v)}"


def _name(v):
    if not isinstance(v, str):
        return f"must be a name (a string), got {_show(v)}"
    return None if _NAME.match(v) else f"must be a plain name (letters, digits, _ - .), got {v[:60]!r}"


def _one_of(*choices):
    def check(v):
        return None if v in choices else f"must be one of {', '.join(map(str, choices))}; got {_show(v)}"
    return check


def _optional(check):
    return lambda v: None if v is None else check(v)


def _size_or_pair(v):
    if isinstance(v, list):
        if len(v) != 2:
            return f"must be a size or a [height, width] pair, got {len(v)} numbers"
        return _int(1, MAX_SIZE)(v[0]) or _int(1, MAX_SIZE)(v[1])
    return _int(1, MAX_SIZE)(v)


def _schedule(v):
    if not isinstance(v, list) or len(v) != 2:
        return f"must be [U, S] (two integers or nulls), got {_show(v)}"
    return _optional(_int(0, MAX_SIZE**2))(v[0]) or _optional(_int(0, MAX_SIZE**2))(v[1])


def _scalar(v):
    ok = v is None or isinstance(v, (bool, int, float, str)) or (
        isinstance(v, list) and len(v) <= 8 and all(isinstance(x, (bool, int, float, str)) for x in v))
    return None if ok else f"must be a number, string or short list of them, got {_show(v)}"


def _reducer_entry(v):
    if not isinstance(v, dict) or not isinstance(v.get("name"), str):
        return f"must be a mapping with a `name`, got {_show(v)}"
    return next((f"{k}: {p}" for k, p in ((k, _scalar(x)) for k, x in v.items()) if p), None)


def _show(v) -> str:
    kind = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    text = kind.get(type(v), type(v).__name__)
    return f"{text} {v!r}" if isinstance(v, (int, float, str)) and len(repr(v)) <= 40 else text


def _normalizations() -> tuple:
    from segm.data.base import STATS

    return tuple(STATS)


def _policy_methods() -> tuple:
    from segm.model.reduction.rules import POLICY_METHODS

    return tuple(POLICY_METHODS)


def _dataset_names() -> tuple:
    from segm.data.base import DATASET_CHOICES

    return tuple(DATASET_CHOICES)


_DECODER = {
    "name": _one_of("linear", "mask_transformer"), "n_cls": _int(1, 1 << 16), "n_layers": _int(1, 64),
    "n_heads": _int(1, 1 << 10), "d_model": _int(1, 1 << 14), "d_ff": _int(1, 1 << 17),
    "dropout": _float(0, 1), "drop_path_rate": _float(0, 1), "encoder_layer": _int(-256, 256),
}


def _net_fields() -> dict:
    return {
        "image_size": _size_or_pair, "patch_size": _int(1, 64), "d_model": _int(1, 1 << 14),
        "n_heads": _int(1, 1 << 10), "n_layers": _int(1, 256), "d_ff": _optional(_int(1, 1 << 17)),
        "n_cls": _int(1, 1 << 16), "normalization": _one_of(*_normalizations()), "distilled": _bool,
        "backbone": _optional(_name), "dropout": _float(0, 1), "drop_path_rate": _float(0, 1),
        "layer_norm_eps": _float(0, 1, open_low=True), "decoder": None,  # checked by _check_decoder
        "policy_method": _one_of(*_policy_methods()), "policy_schedule": _optional(_schedule),
        "token_reduction": _optional(_float(0, 1)), "policy_backbone": _optional(_name),
        "random_seed": _int(0, (1 << 64) - 1), "oracle_dataset": _optional(_one_of(*_dataset_names())),
        "reducer": _optional(_reducer_entry),
    }


_NET_REQUIRED = ("image_size", "patch_size", "d_model", "n_heads", "n_layers", "n_cls", "decoder")
_DATASET = {"dataset": _optional(_name), "image_size": _optional(_int(1, MAX_SIZE)),
            "crop_size": _optional(_int(1, MAX_SIZE)), "normalization": _optional(_name)}
_INFERENCE = {k: _optional(_int(1, MAX_SIZE)) for k in INFERENCE_KEYS}


# --------------------------------------------------------------------------- reading
def read_config(path) -> dict:
    """config.json parsed with bounds: its size, its nesting depth, no NaN/Infinity constants,
    no repeated keys. Linear in the file's size (no regular expression, no recursion of ours)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise SharedFolderError(f"{path} is larger than {MAX_CONFIG_BYTES // 1024} KB: not a model config")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise SharedFolderError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise SharedFolderError(f"cannot read {path}: {e.strerror or e}") from None
    too_deep = f"{path} nests deeper than {MAX_DEPTH} levels: not a model config"
    try:
        config = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except RecursionError:  # nested past the interpreter's limit
        raise SharedFolderError(too_deep) from None
    except ValueError as e:
        raise SharedFolderError(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if _deeper_than(config, MAX_DEPTH):
        raise SharedFolderError(too_deep)
    if not isinstance(config, dict):
        raise SharedFolderError(f"{path} must hold a JSON object, got {_show(config)}")
    return config


def _deeper_than(value, limit: int) -> bool:
    """Whether lists and mappings nest more than `limit` deep (no recursion)."""
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


def _no_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def _unique_keys(pairs):
    mapping = dict(pairs)
    if len(mapping) < len(pairs):
        seen = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {repeated!r} appears twice")
    return mapping


# --------------------------------------------------------------------------- checking
def check_config(config: dict, path) -> dict:
    """The variant a valid shared `config` describes (tuples restored, the classes attached);
    raises SharedFolderError naming `path` and the field otherwise."""
    where = _Where(Path(path))
    top = {"format": None, "variant": None, "dataset": _optional(_name), "class_names": None, "palette": None,
           "normalization": None, "crop_size": None, "policy": None, "reducer": None}
    _check_mapping(config, top, where, "", required=("format", "variant", "palette"))
    if config["format"] != FORMAT:
        where.fail("format", f"must be {FORMAT!r}, got {_show(config['format'])}")
    variant = _check_variant(config["variant"], where)
    spec = _model_rules(variant["net_kwargs"], where)
    n_cls = variant["net_kwargs"]["n_cls"]
    _check_classes(config, n_cls, where)
    _check_summary(config, variant, spec, where)
    variant["classes"] = {"names": config.get("class_names"), "palette": config["palette"]}
    return variant


class _Where:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, problem: str):
        raise SharedFolderError(f"{self.path}: `{field}` {problem}")


def _check_mapping(obj, fields: dict, where: _Where, prefix: str, required=()) -> None:
    """`obj` is a mapping of known keys only, each passing its check; no key holds a path."""
    if not isinstance(obj, dict):
        where.fail(prefix.rstrip(".") or "(top level)", f"must be a mapping, got {_show(obj)}")
    for key in required:
        if key not in obj:
            where.fail(prefix + key, "is missing")
    for key, value in obj.items():
        if key in PATH_KEYS:
            if value is not None:
                where.fail(prefix + key, "names a file or model outside the folder; a shared folder is closed "
                           "(its weights, policy network included, are in model.safetensors): remove the key")
            continue
        if key not in fields:
            where.fail(prefix + key, f"is not a known field (known: {', '.join(fields)})")
        problem = fields[key](value) if fields[key] is not None else None
        if problem:
            where.fail(prefix + key, problem)


def _check_variant(variant, where: _Where) -> dict:
    parts = {"net_kwargs": None, "dataset_kwargs": None, "inference_kwargs": None}
    _check_mapping(variant, parts, where, "variant.", required=("net_kwargs",))
    net = variant["net_kwargs"]
    _check_mapping(net, _net_fields(), where, "variant.net_kwargs.", required=_NET_REQUIRED)
    _check_mapping(net["decoder"], _DECODER, where, "variant.net_kwargs.decoder.", required=("name",))
    dataset = {**_DATASET, "normalization": _optional(_one_of(*_normalizations()))}
    _check_mapping(variant.get("dataset_kwargs") or {}, dataset, where, "variant.dataset_kwargs.")
    _check_mapping(variant.get("inference_kwargs") or {}, _INFERENCE, where, "variant.inference_kwargs.")
    _check_widths(net, where)
    out = {k: v for k, v in variant.items() if v is not None}
    out["net_kwargs"] = {k: (tuple(v) if k in ("image_size", "policy_schedule") and isinstance(v, list) else v)
                         for k, v in net.items() if k not in PATH_KEYS}
    return out


def _check_widths(net: dict, where: _Where) -> None:
    """What the encoder and decoder sizes mean for each other: heads divide the width, the
    decoder predicts the model's classes."""
    field = "variant.net_kwargs."
    if net["d_model"] % net["n_heads"]:
        where.fail(field + "n_heads", f"({net['n_heads']}) must divide d_model ({net['d_model']})")
    dec = net["decoder"]
    if dec.get("n_cls", net["n_cls"]) != net["n_cls"]:
        where.fail(field + "decoder.n_cls", f"({dec['n_cls']}) must equal n_cls ({net['n_cls']})")
    if dec["name"] == "mask_transformer":
        width = dec.get("d_model") or net["d_model"]
        heads = dec.get("n_heads") or width // 64
        if heads < 1 or width % heads:
            where.fail(field + "decoder.n_heads", f"({heads}) must divide the decoder width ({width})")


def _model_rules(net: dict, where: _Where):
    """The model's own rules (crop, token budget, policy, reducer settings), the ones every
    model description passes (`segm.model.spec.check_net_kwargs`), named as this file's."""
    from segm.model.spec import check_net_kwargs

    try:
        return check_net_kwargs(net, policy_ckpt_required=False)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, ArithmeticError) as e:
        where.fail("variant.net_kwargs", f"does not describe a model: {str(e).splitlines()[0]}")


def _check_classes(config: dict, n_cls: int, where: _Where) -> None:
    palette, names = config["palette"], config.get("class_names")
    if not isinstance(palette, list) or len(palette) != n_cls:
        where.fail("palette", f"must list {n_cls} colours (n_cls), got {_show(palette)}"
                   + (f" of {len(palette)}" if isinstance(palette, list) else ""))
    for i, colour in enumerate(palette):
        if not (isinstance(colour, list) and len(colour) == 3 and not any(_int(0, 255)(c) for c in colour)):
            where.fail(f"palette[{i}]", f"must be [r, g, b] with integers in 0..255, got {colour!r}"[:200])
    if names is None:
        return
    if not isinstance(names, list) or len(names) != n_cls:
        where.fail("class_names", f"must list {n_cls} names (n_cls) or be null, got {_show(names)}")
    bad = next((i for i, n in enumerate(names) if not isinstance(n, str) or len(n) > 200), None)
    if bad is not None:
        where.fail(f"class_names[{bad}]", f"must be a string of at most 200 characters, got {_show(names[bad])}")


def _check_summary(config: dict, variant: dict, spec, where: _Where) -> None:
    """The summary fields a reader of config.json sees agree with the model they describe."""
    from segm.data.base import STATS, variant_normalization

    dataset = (variant.get("dataset_kwargs") or {}).get("dataset")
    if config.get("dataset") is not None and config["dataset"] != dataset:
        where.fail("dataset", f"({config['dataset']!r}) must equal variant.dataset_kwargs.dataset ({dataset!r})")
    if "crop_size" in config and config["crop_size"] != list(spec.crop):
        where.fail("crop_size", f"must be the model's crop {list(spec.crop)} (net_kwargs.image_size), "
                   f"got {_show(config['crop_size'])}")
    if "normalization" in config:
        name = variant_normalization(variant)
        expected = {"name": name, **{k: list(v) for k, v in STATS[name].items()}}
        if config["normalization"] != expected:
            where.fail("normalization", f"must be {expected} (the variant's), got {_show(config['normalization'])}")
    _check_policy_summary(config, spec, where)


def _check_policy_summary(config: dict, spec, where: _Where) -> None:
    policy = config.get("policy")
    if policy is not None:
        expected = {"method": spec.policy_method, "num_shared": spec.num_shared,
                    "num_notshared": spec.num_notshared}
        if not isinstance(policy, dict) or any(policy.get(k) != v for k, v in expected.items()):
            where.fail("policy", f"must agree with net_kwargs: {expected}, got {policy!r}"[:300])
        _check_mapping(policy, {**{k: None for k in expected}, "policy_backbone": _optional(_name)}, where, "policy.")
    reducer = config.get("reducer")
    if reducer is not None:
        name = spec.reduction.method
        if not isinstance(reducer, dict) or reducer.get("reducer") != name:
            where.fail("reducer", f"must describe the model's reducer {name!r} (net_kwargs), got {_show(reducer)}")
        for key, value in reducer.items():
            problem = _scalar(value) if not isinstance(value, dict) else _reducer_entry({"name": "", **value})
            if problem:
                where.fail(f"reducer.{key}", problem)


def check_variant_file(variant: dict, path) -> None:
    """A checkpoint's description (its `variant.yml`: ours, the reference's or a stranger's):
    every `net_kwargs` field this project reads, and its decoder's, has the type and range the
    shared schema gives it; one line naming the file and the field. Unlike a shared config.json,
    keys this project does not read are ignored (a reference run records many), and paths are
    allowed: `policynet_ckpt` says where the policy's record lies; `pretrained` is never read
    when a checkpoint is loaded (its weights are the checkpoint's)."""
    where = _Where(Path(path))
    net = variant.get("net_kwargs")
    if not isinstance(net, dict):
        where.fail("net_kwargs", f"must be a mapping, got {_show(net)}")
    _check_known(net, _net_fields(), where, "net_kwargs.")
    decoder = net.get("decoder")
    if isinstance(decoder, dict):
        _check_known(decoder, _DECODER, where, "net_kwargs.decoder.")
    elif decoder is not None and not isinstance(decoder, str):
        where.fail("net_kwargs.decoder", f"must be a decoder name or a mapping, got {_show(decoder)}")
    d, heads = net.get("d_model"), net.get("n_heads")
    if isinstance(d, int) and isinstance(heads, int) and d % heads:
        where.fail("net_kwargs.n_heads", f"({heads}) must divide d_model ({d})")


def _check_known(obj: dict, fields: dict, where: _Where, prefix: str) -> None:
    """Each key of `obj` that `fields` checks passes its check (tuples read as lists); others pass."""
    for key, value in obj.items():
        check = fields.get(key)
        problem = check(list(value) if isinstance(value, tuple) else value) if check is not None else None
        if problem:
            where.fail(prefix + key, problem)
