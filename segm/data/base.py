"""Dataset facts: names, roots, class files, normalisation statistics.

The folders inside each dataset's root are described in `segm.data.layout`.

Classes file format (YAML), used by the built-in datasets (`segm/data/classes/*.yml`),
by `synthetic` (`<root>/classes.yml`) and by `custom` datasets (`--classes FILE`)::

    names: [sky, wall, floor]          # K class names; class i has train label i
    palette: [[135, 190, 235], ...]    # optional, K RGB triples 0..255 (default: generated)
    ignore_index: 255                  # optional, the label value in the PNGs meaning
                                       # "ignore" (default 255); remapped to 255 on load
    reduce_zero_label: false           # optional (default false); true = ADE20K style:
                                       # PNG value 0 is "ignore" and class i is stored as i + 1

Annotation PNGs hold one class index per pixel (mode L or P). With
`reduce_zero_label: true` they hold 0..K, otherwise 0..K-1 plus `ignore_index`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from segm.config import dataset_dir, load_yaml

from .names import ROOT_DIRS

IGNORE_LABEL = 255

# 0-1 scale; the pipelines use them ×255 rounded to 2 decimals, as the reference.
STATS = {
    "vit": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    "deit": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
}

DATASET_NAMES = ("ade20k", "pascal_context", "cityscapes", "synthetic", "custom")
_ALIASES = {"pcontext": "pascal_context"}  # the reference's spelling
DATASET_CHOICES = DATASET_NAMES + tuple(_ALIASES)  # what the command lines accept

# The command that creates each dataset's folder under $DATASET (`names.ROOT_DIRS`).
PREPARE_COMMANDS = {
    "ade20k": "python -m segm.scripts.prepare_ade20k $DATASET",
    "pascal_context": "python -m segm.scripts.prepare_pcontext $DATASET",
    "cityscapes": "python -m segm.scripts.prepare_cityscapes $DATASET --username U --password P",
    "synthetic": "python -m segm.scripts.prepare_synthetic $DATASET",
}

# Image files of synthetic/custom folders (`segm.data.layout`).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Train img_scale = (max_ratio * im_size, im_size).
MAX_RATIO = {"ade20k": 4, "pascal_context": 8, "cityscapes": 2, "synthetic": 4, "custom": 4}

_CLASSES_DIR = Path(__file__).resolve().parent / "classes"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model, losses and metrics need to know about a dataset.

    `ignore_index` is in train label space and always `IGNORE_LABEL`; the value used in the
    annotation files (ADE20K: 0) is mapped to it when labels are loaded.
    """

    name: str
    n_cls: int
    class_names: list  # K names
    palette: list  # K [R, G, B] triples, 0..255
    ignore_index: int = IGNORE_LABEL
    reduce_zero_label: bool = False
    label_ignore_value: int = IGNORE_LABEL  # the value in the files (before reduction)


def canonical_name(name: str) -> str:
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise ValueError(
            f"unknown dataset {name!r}: choose one of {', '.join(DATASET_NAMES)} (or pcontext)"
        )
    return key


def normalization_stats(normalization: str) -> dict:
    """Mean and std on the 0-255 scale, rounded to 2 decimals as the reference (np.round)."""
    if normalization not in STATS:
        raise ValueError(f"unknown normalization {normalization!r}: choose one of {sorted(STATS)}")
    return {k: [float(x) for x in np.round(255 * np.array(v), 2)] for k, v in STATS[normalization].items()}


def variant_normalization(variant: dict) -> str:
    """The input normalisation a checkpoint was trained with: its variant's
    `dataset_kwargs.normalization`, else its model preset's (`net_kwargs.normalization`)."""
    norm = ((variant.get("dataset_kwargs") or {}).get("normalization")
            or (variant.get("net_kwargs") or {}).get("normalization"))
    if norm not in STATS:
        raise ValueError(f"the checkpoint's variant names no known normalization (got {norm!r}; "
                         f"expected one of {sorted(STATS)} in dataset_kwargs.normalization)")
    return norm


def default_root(name: str) -> Path:
    name = canonical_name(name)
    if name == "custom":
        raise ValueError("the custom dataset needs its folder: pass --data-root DIR (data_root=...)")
    return dataset_dir() / ROOT_DIRS[name]


def generated_palette(n: int) -> list:
    """A deterministic random palette for classes files that give none."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, 3)).tolist()


def read_classes_file(path, name: str = "custom") -> DatasetInfo:
    """Parse and validate a classes file (format in the module docstring)."""
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict) or "names" not in data:
        raise ValueError(f"classes file {path} must be a mapping with a 'names' list")
    names = data["names"]
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"classes file {path}: 'names' must be a non-empty list of strings")
    n_cls = len(names)
    if len(set(names)) != n_cls:
        raise ValueError(f"classes file {path}: 'names' holds duplicates")
    if n_cls > 255:
        raise ValueError(f"classes file {path}: at most 255 classes are supported, got {n_cls}")
    palette = data.get("palette") or generated_palette(n_cls)
    ok = len(palette) == n_cls and all(
        isinstance(c, (list, tuple)) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
        for c in palette
    )
    if not ok:
        raise ValueError(f"classes file {path}: 'palette' must hold {n_cls} RGB triples of ints in 0..255")
    reduce_zero_label = data.get("reduce_zero_label", False)
    ignore = data.get("ignore_index", IGNORE_LABEL)
    if not isinstance(reduce_zero_label, bool):
        raise ValueError(f"classes file {path}: 'reduce_zero_label' must be true or false")
    if not isinstance(ignore, int) or not 0 <= ignore <= 255:
        raise ValueError(f"classes file {path}: 'ignore_index' must be an int in 0..255")
    if reduce_zero_label and ignore != IGNORE_LABEL:
        raise ValueError(
            f"classes file {path}: with reduce_zero_label the ignore value is 0; "
            f"leave ignore_index at {IGNORE_LABEL}"
        )
    if not reduce_zero_label and ignore != IGNORE_LABEL and ignore < n_cls:
        raise ValueError(
            f"classes file {path}: ignore_index {ignore} collides with class {ignore} ({names[ignore]})"
        )
    if reduce_zero_label and n_cls > 254:
        raise ValueError(f"classes file {path}: reduce_zero_label allows at most 254 classes")
    return DatasetInfo(
        name=name,
        n_cls=n_cls,
        class_names=list(names),
        palette=[list(c) for c in palette],
        ignore_index=IGNORE_LABEL,
        reduce_zero_label=reduce_zero_label,
        label_ignore_value=0 if reduce_zero_label else ignore,
    )


def classes_file_for(name: str, data_root=None, classes_file=None) -> Path:
    name = canonical_name(name)
    if classes_file is not None:
        return Path(classes_file)
    if name in ("ade20k", "pascal_context", "cityscapes"):
        return _CLASSES_DIR / f"{name}.yml"
    root = Path(data_root) if data_root is not None else default_root(name)
    path = root / "classes.yml"
    if not path.is_file():
        if name == "synthetic":
            raise FileNotFoundError(
                f"synthetic dataset not found at {root}: run `{PREPARE_COMMANDS['synthetic']}`"
            )
        raise FileNotFoundError(
            f"custom dataset: no classes file given and none at {path}; pass --classes FILE "
            "(YAML with names, palette, ignore_index, reduce_zero_label)"
        )
    return path


def dataset_info(name: str, data_root=None, classes_file=None) -> DatasetInfo:
    """Classes, palette and label conventions of a dataset.

    Built-in datasets read `segm/data/classes/<name>.yml`; `synthetic` and `custom` read
    `classes_file`, else `<data_root>/classes.yml`.
    """
    name = canonical_name(name)
    if name == "custom" and data_root is None and classes_file is None:
        raise ValueError("the custom dataset needs --data-root DIR and --classes FILE")
    return read_classes_file(classes_file_for(name, data_root, classes_file), name=name)
