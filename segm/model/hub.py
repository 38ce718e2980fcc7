"""A trained model in one shareable folder: weights as safetensors, a `config.json` and a model
card, in the layout of Hugging Face's `PyTorchModelHubMixin` (so the folder can be pushed to a
hub as it is). Loading reads only JSON and safetensors: nothing is unpickled.

    python -m segm.share runs/ade20k_vit_s_cts/checkpoint.pth shared/ade20k_vit_s_cts
    model, variant = segm.load_model("shared/ade20k_vit_s_cts")
"""
from __future__ import annotations

import json
from pathlib import Path

from segm.utils.atomic import atomic_write, atomic_write_text

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
FORMAT = "segm-cts-model/1"
# The variant parts a shared model keeps: what builds it and what inference needs.
_VARIANT_KEYS = ("net_kwargs", "dataset_kwargs", "inference_kwargs")
_PRIVATE_DATASET_KEYS = ("data_root", "classes_file", "num_workers", "batch_size", "split")
# Files that would have to be unpickled: never loaded from a shared folder.
_PICKLED = ("pytorch_model.bin", "checkpoint.pth", "model.pth", "model.pt")


def is_shared_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file() and not (Path(path) / "checkpoint.pth").is_file()


def model_config(model, variant: dict) -> dict:
    """config.json: the variant's model part plus what a colleague needs to use the model."""
    from segm.data.base import STATS, variant_normalization
    from segm.visualize import checkpoint_classes

    kept = {k: variant[k] for k in _VARIANT_KEYS if k in variant}
    kept["dataset_kwargs"] = {k: v for k, v in (kept.get("dataset_kwargs") or {}).items()
                              if k not in _PRIVATE_DATASET_KEYS}
    net = variant["net_kwargs"]
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


def share_model(model, variant: dict, out_dir, *, overwrite: bool = False) -> Path:
    """Writes `out_dir/{model.safetensors, config.json, README.md}` (each atomically)."""
    from safetensors.torch import save

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose another folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = model_config(model, variant)
    atomic_write(out / WEIGHTS, lambda f: f.write(save(state, metadata={"format": FORMAT})))
    atomic_write_text(out / CONFIG, json.dumps(config, indent=1) + "\n")
    atomic_write_text(out / CARD, model_card(config, out.name))
    return out


def read_shared(folder) -> tuple[dict, dict]:
    """(variant, state dict) of a shared folder; reads JSON and safetensors only. The model is
    built from them by `segm.model.factory.load_model`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        pickled = [name for name in _PICKLED if (folder / name).exists()]
        hint = f" ({pickled[0]} is a pickle and is never loaded from a shared folder)" if pickled else ""
        raise FileNotFoundError(f"{folder} has no {WEIGHTS}{hint}: export it with `python -m segm.share`")
    try:
        config = json.loads((folder / CONFIG).read_text())
        state = load_file(str(folder / WEIGHTS))
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"cannot read the shared model in {folder}: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG} is not a shared segm-cts model (format {FORMAT})")
    variant = _restore_tuples(config["variant"])
    variant["classes"] = {"names": config.get("class_names"), "palette": config.get("palette")}
    return variant, state


def _restore_tuples(variant: dict) -> dict:
    """JSON has no tuples; the model description holds two."""
    net = dict(variant["net_kwargs"])
    for key in ("image_size", "policy_schedule"):
        if isinstance(net.get(key), list):
            net[key] = tuple(net[key])
    return {**variant, "net_kwargs": net}


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
