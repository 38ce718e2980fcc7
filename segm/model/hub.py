"""A trained model in one shareable folder: weights as safetensors, a `config.json` and a model
card, in the layout of Hugging Face's `PyTorchModelHubMixin` (so the folder can be pushed to a
hub as it is). The folder is written as a whole (a temporary sibling, then a rename) and carries
no path of the sharer's.

Loading a folder from a stranger reads only its `config.json` (checked by
`segm.model.shared_schema` before anything is built) and `model.safetensors` (sizes checked on
the header against the config before any tensor is allocated, dtypes against the model, values
finite); it follows no path or model name and makes no network call.

    python -m segm.share runs/ade20k_vit_s_cts/checkpoint.pth shared/ade20k_vit_s_cts
    model, variant = segm.load_model("shared/ade20k_vit_s_cts")
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from segm.model.shared_schema import (
    DATASET_KEYS, FORMAT, INFERENCE_KEYS, PATH_KEYS, SharedFolderError, check_config, read_config,
)
from segm.utils.writable import NotWritableError, write_error_message

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
# Files that would have to be unpickled: never loaded from a shared folder.
_PICKLED = ("pytorch_model.bin", "checkpoint.pth", "model.pth", "model.pt")
_PARTIAL = ".partial-"  # a folder being written: `.NAME.partial-XXXX` beside NAME
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def is_shared_folder(path) -> bool:
    """A folder without checkpoint.pth that holds any part of a shared model (what is missing
    is then named by `read_shared`)."""
    path = Path(path)
    marks = (CONFIG, WEIGHTS, *_PICKLED[:1])
    return path.is_dir() and not (path / "checkpoint.pth").is_file() and any((path / m).is_file() for m in marks)


def model_config(model, variant: dict) -> dict:
    """config.json: the variant's model part plus what a colleague needs to use the model; no
    path (policy checkpoint, pretrained weights, data root) is kept."""
    from segm.data.base import STATS, variant_normalization
    from segm.visualize import checkpoint_classes

    net = {k: v for k, v in variant["net_kwargs"].items() if k not in PATH_KEYS}
    kept = {"net_kwargs": net,
            "dataset_kwargs": {k: v for k, v in (variant.get("dataset_kwargs") or {}).items() if k in DATASET_KEYS},
            "inference_kwargs": {k: v for k, v in (variant.get("inference_kwargs") or {}).items()
                                 if k in INFERENCE_KEYS}}
    normalization = variant_normalization(variant)
    names, palette, _ = checkpoint_classes(variant, model.n_cls)
    return {
        "format": FORMAT,
        "variant": kept,  # json writes tuples as lists
        "dataset": kept["dataset_kwargs"].get("dataset"),
        "class_names": names,
        "palette": palette,
        "normalization": {"name": normalization, **{k: list(v) for k, v in STATS[normalization].items()}},
        "crop_size": list(model.crop_size),
        "policy": {**model.reducer.policy_record(), "policy_backbone": net.get("policy_backbone")},
        "reducer": model.describe_reduction(),
    }


# --------------------------------------------------------------------------- writing
def share_model(model, variant: dict, out_dir, *, overwrite: bool = False) -> Path:
    """Writes `out_dir/{model.safetensors, config.json, README.md}` as a whole: into a temporary
    sibling folder, then renamed to `out_dir` (replacing it with `overwrite`). A failed write
    (disk full) raises NotWritableError naming the file and leaves `out_dir` as it was."""
    from safetensors.torch import save

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotWritableError(f"{out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose another folder or pass --overwrite")
    if overwrite:
        _remove_partial(out)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = model_config(model, variant)
    files = {WEIGHTS: lambda: save(state, metadata={"format": FORMAT}),
             CONFIG: lambda: (json.dumps(config, indent=1) + "\n").encode(),
             CARD: lambda: model_card(config, out.name).encode()}
    _write_folder(out, files)
    return out


def _write_folder(out: Path, files: dict) -> None:
    """Each of `files` (name → bytes maker) into a temporary sibling of `out`, then renamed to
    `out`; any failed write is one NotWritableError naming the file."""
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_partial(out)
        for name, content in files.items():
            try:
                _write_file(tmp / name, content())
            except OSError as e:
                raise NotWritableError(write_error_message(e, out / name)) from None
        _swap_in(tmp, out)
    except OSError as e:
        raise NotWritableError(write_error_message(e, out)) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, out: Path) -> None:
    """`tmp` becomes `out`; a former `out` is removed once the new one is in place (and put
    back if the rename fails)."""
    old = _set_aside(out)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _set_aside(out: Path) -> Path | None:
    """Moves an existing `out` to a partial sibling (removed once the new folder is in place)."""
    if not out.exists():
        return None
    old = _new_partial(out)
    os.replace(out, old / out.name)
    return old


def _remove_partial(out: Path) -> None:
    """Folders a killed share left beside `out`."""
    if out.parent.is_dir():
        for stale in out.parent.glob(f".{out.name}{_PARTIAL}*"):
            shutil.rmtree(stale, ignore_errors=True)


def _new_partial(out: Path) -> Path:
    """A new empty `.NAME.partial-XXXX` sibling of `out`, made with mode 0777 so that the kernel
    applies the umask (and a default ACL) as for any folder the user makes."""
    for _ in range(100):
        tmp = out.parent / f".{out.name}{_PARTIAL}{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot write {out}: no free temporary name in {out.parent}")


# --------------------------------------------------------------------------- reading
def read_shared(folder) -> tuple[dict, dict]:
    """(variant, header) of a shared folder: config.json checked by its schema, and the model
    sizes it describes checked against the weights' shapes (`header`: name → (dtype, shape),
    read from the safetensors header; no tensor is read). The model is then built by
    `segm.model.factory.load_model` and filled by `load_weights`."""
    folder = Path(folder)
    _check_present(folder)
    variant = check_config(read_config(folder / CONFIG), folder / CONFIG)
    header = read_header(folder / WEIGHTS)
    check_sizes(variant["net_kwargs"], header, folder / CONFIG)
    return variant, header


def _check_present(folder: Path) -> None:
    pickled = [name for name in _PICKLED if (folder / name).exists()]
    hint = f" ({pickled[0]} is a pickle and is never loaded from a shared folder)" if pickled else ""
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}{hint}: a shared model folder holds {CONFIG} and "
                                    f"{WEIGHTS}, written by `python -m segm.share`")


def read_header(path: Path) -> dict:
    """name → (dtype, shape) from a safetensors file's header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (OSError, ValueError, SafetensorError) as e:
        raise SharedFolderError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
def check_sizes(net: dict, header: dict, config: Path, *, prefix: str = "variant.net_kwargs",
                weights: str = WEIGHTS, policy: bool = True) -> None:
    """The sizes a model description gives (width, depth, patch, crop, classes, MLP widths, the
    policy network) against the shapes of the weights (`header`: name → (dtype, shape)), before
    the model is built: a description cannot ask for more memory than its weights fill. Errors
    name `config` (config.json, or a checkpoint's variant.yml), the field under `prefix` and
    the `weights` file. `policy`: also the policy network's (a shared folder records its
    backbone; a checkpoint's may lie beside its policynet_ckpt, and is checked when built)."""
    from segm.model.spec import complete_net_kwargs

    net = complete_net_kwargs(net)
    for name, shape, fields in _expected_shapes(net):
        found = header.get(name, (None, None))[1]
        if found != shape:
            held = f"holds {name} of shape {found}" if found is not None else f"has no tensor {name}"
            raise SharedFolderError(f"{config}: `{prefix}` {fields} describe {name} of shape "
                                    f"{shape}, but {weights} {held}")
    for blocks, count, field in _expected_blocks(net):
        found = len({k[len(blocks):].split(".")[0] for k in header if k.startswith(blocks)})
        if found != count:
            raise SharedFolderError(f"{config}: `{prefix}.{field}` is {count}, but {weights} "
                                    f"holds {found} blocks under {blocks}")
    if policy:
        _check_policy_sizes(net, header, config, prefix, weights)


def _expected_shapes(net: dict) -> list:
    d, p, n_cls = net["d_model"], net["patch_size"], net["n_cls"]
    h, w = net["image_size"] if isinstance(net["image_size"], (tuple, list)) else (net["image_size"],) * 2
    prefix = 2 if net.get("distilled") else 1  # class (and distillation) tokens
    shapes = [("encoder.patch_embed.proj.weight", (d, 3, p, p), "d_model, patch_size"),
              ("encoder.pos_embed", (1, (h // p) * (w // p) + prefix, d), "image_size, patch_size, distilled"),
              ("encoder.blocks.0.mlp.fc1.weight", (_mlp_width(d, net.get("d_ff")), d), "d_ff")]
    dec = net["decoder"]
    if dec["name"] == "linear":
        return shapes + [("decoder.head.weight", (n_cls, d), "n_cls")]
    dd = dec.get("d_model") or d
    return shapes + [("decoder.cls_emb", (1, n_cls, dd), "n_cls, decoder.d_model"),
                     ("decoder.proj_dec.weight", (dd, d), "decoder.d_model"),
                     ("decoder.blocks.0.mlp.fc1.weight", (_mlp_width(dd, dec.get("d_ff")), dd), "decoder.d_ff")]


def _mlp_width(d: int, d_ff: int | None) -> int:
    return int(d * ((d_ff or 4 * d) / d))  # as the blocks compute it from their mlp_ratio


def _expected_blocks(net: dict) -> list:
    blocks = [("encoder.blocks.", net["n_layers"], "n_layers")]
    if net["decoder"]["name"] == "mask_transformer":
        blocks.append(("decoder.blocks.", net["decoder"].get("n_layers", 2), "decoder.n_layers"))
    return blocks


def _check_policy_sizes(net: dict, header: dict, config: Path, prefix: str, weights: str) -> None:
    """The policy network's shapes, from a build on the meta device (no memory)."""
    import torch

    from segm.model.policy.net import PolicyNet
    from segm.model.reduction.policy_rules import uses_policy_net
    from segm.model.reduction.rules import DEFAULT_POLICY_BACKBONE

    if not uses_policy_net(net.get("policy_method", "no_sharing")):
        return
    backbone = net.get("policy_backbone") or DEFAULT_POLICY_BACKBONE
    try:
        with torch.device("meta"):
            own = {f"policy_net.{k}": tuple(v.shape) for k, v in PolicyNet(backbone).state_dict().items()}
    except (ValueError, RuntimeError, TypeError, AttributeError, AssertionError) as e:  # timm's, per model
        raise SharedFolderError(f"{config}: `{prefix}.policy_backbone` {backbone!r} cannot be "
                                f"built as a policy network ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                                ) from None
    bad = next((k for k, shape in own.items() if header.get(k, (None, None))[1] != shape), None)
    if bad is not None:
        found = header.get(bad, (None, None))[1]
        held = f"holds shape {found}" if found is not None else "has no such tensor"
        raise SharedFolderError(f"{config}: `{prefix}.policy_backbone` {backbone!r} has {bad} of "
                                f"shape {own[bad]}, {weights} {held}")


def load_weights(folder, model, header: dict) -> dict:
    """The weights of `folder` for `model`: each tensor's dtype as the model's (any float for a
    float; an integer or bool tensor is refused, never cast), every float value finite."""
    import torch
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS
    own = model.state_dict()
    for name, (dtype, _) in header.items():
        if name in own and not _dtype_fits(dtype, own[name].dtype):
            raise SharedFolderError(f"{path}: tensor {name} is {dtype}, the model holds {own[name].dtype}")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types; the header was already read
        raise SharedFolderError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise SharedFolderError(f"{path}: tensor {bad} holds NaN or infinite values")
    return state


def _dtype_fits(stored: str, wanted) -> bool:
    import torch

    if wanted.is_floating_point:
        return stored in _FLOAT_DTYPES
    return stored == {torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8"}.get(wanted)


def _reduction_words(config: dict, h: int, w: int) -> str:
    """The card's sentence on token reduction, from the recorded description."""
    r = config.get("reducer") or {}
    settings = {k: v for k, v in r.items() if k not in ("reducer", "tokens", "reduction")}
    tokens = f"{r['tokens']} tokens per {h}×{w} window" if r.get("tokens") is not None else "a varying token count"
    return f"`{r.get('reducer', 'none')}`, {tokens}" + "".join(f", {k} {v}" for k, v in settings.items())


def model_card(config: dict, name: str) -> str:
    net = config["variant"]["net_kwargs"]
    h, w = config["crop_size"]
    classes = config["class_names"]
    return f"""---
library_name: segm-cts
tags: [semantic-segmentation, vision-transformer, token-sharing]
---
# {name}

Segmenter ({net.get('backbone')}, {net['decoder'].get('name')} decoder) trained on
{config.get('dataset')} ({net['n_cls']} classes), with token reduction: {_reduction_words(config, h, w)}.

Inputs: RGB, normalised with mean {config['normalization']['mean']} and std
{config['normalization']['std']} (0–1 scale); sliding windows of {h}×{w}.

```python
import segm
model, variant = segm.load_model("{name}")          # this folder
labels = segm.predict(model, image, variant=variant)   # (H, W) class indices
```

Classes: {', '.join(classes) if classes else 'not recorded'}.
"""
