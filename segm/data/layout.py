"""Where each dataset keeps its files: the one description of every folder layout.

`dataset_root` finds a dataset's folder, `split_layout` names the image folder, the annotation
folder, their suffixes and the split file of one split, and `pair_files` lists the
(image, label) pairs of a split. The names in these layouts are `segm.data.names`'. `segm.data.datasets` (through mmseg) and `policynet.data`
both read datasets through these. Layouts under the dataset's folder:

- ade20k: `ADEChallengeData2016/{images,annotations}/{training,validation}/<name>.{jpg,png}`,
  test images in `release_test/testing/`;
- cityscapes: `leftImg8bit/<split>/<city>/<name>_leftImg8bit.png` and
  `gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png`;
- pascal_context: `VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext}/<id>.{jpg,png}`,
  ids listed in `ImageSets/SegmentationContext/<split>.txt`;
- synthetic, custom: `{images,annotations}/{training,validation}/`, images of any common
  extension (`IMAGE_EXTENSIONS`), labels `<stem>.png`, subfolders allowed.

No mmseg import here: commands that only list files stay fast to start.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import names as n
from .base import IMAGE_EXTENSIONS, PREPARE_COMMANDS, canonical_name, default_root
from .io import DataError


@dataclass(frozen=True)
class SplitLayout:
    """One split's files. `img_suffix` is the end of every image name (a tuple: any of these
    extensions); a label is the image's path relative to `img_dir`, under `ann_dir`, with
    `img_suffix` replaced by `ann_suffix`. With a `split_file`, its lines are the names
    without suffix and no folder is scanned. `ann_dir` is None for unlabelled test splits."""

    img_dir: Path
    ann_dir: Path | None
    img_suffix: str | tuple[str, ...]
    ann_suffix: str
    split_file: Path | None = None


def missing_error(name: str, root: Path, expected: Path) -> FileNotFoundError:
    """The error for a dataset folder (or a part of it) that is not there."""
    missing = "" if expected == root else f" (missing {expected})"
    if name == "custom":
        return FileNotFoundError(
            f"custom dataset folder {root} not found{missing}: --data-root DIR needs "
            "images/{training,validation} and annotations/{training,validation}"
        )
    return FileNotFoundError(
        f"{name} dataset not found at {root}{missing}: run `{PREPARE_COMMANDS[name]}` or pass --data-root DIR"
    )


def dataset_root(name: str, data_root=None) -> Path:
    """The dataset's own folder: `data_root`, else `$DATASET/<folder>`; checked to exist."""
    name = canonical_name(name)
    root = Path(data_root) if data_root is not None else default_root(name)
    if not root.is_dir():
        raise missing_error(name, root, root)
    return root


def check_split(name: str, split: str) -> None:
    name = canonical_name(name)
    if split not in n.SPLITS:
        raise ValueError(f"unknown split {split!r}: choose train, val or test")
    splits = n.DATASET_SPLITS[name]
    if split not in splits and name == "pascal_context":
        raise ValueError("Pascal Context has no test split: use split='val'")
    if split not in splits:
        raise ValueError(f"the {name} dataset has the splits {' and '.join(splits)}, not {split!r}")


def split_layout(name: str, root, split: str) -> SplitLayout:
    """The files of one split of a dataset under `root`; every folder it names exists."""
    name = canonical_name(name)
    check_split(name, split)
    root = Path(root)
    if name == "ade20k":
        base = root / n.ADE20K_DIR
        if split == "test":
            layout = SplitLayout(root / n.ADE20K_TEST_DIR, None, ".jpg", ".png")
        else:
            sub = n.FOLDER_SPLITS[split]
            layout = SplitLayout(base / n.IMAGE_DIR / sub, base / n.LABEL_DIR / sub, ".jpg", ".png")
    elif name == "pascal_context":
        base = root / n.VOC_DIR
        layout = SplitLayout(base / n.PCONTEXT_IMAGE_DIR, base / n.PCONTEXT_LABEL_DIR, ".jpg", ".png",
                             split_file=base / n.PCONTEXT_SPLIT_DIR / f"{split}.txt")
    elif name == "cityscapes":
        layout = SplitLayout(root / n.CITYSCAPES_IMAGE_DIR / split, root / n.CITYSCAPES_LABEL_DIR / split,
                             n.CITYSCAPES_IMAGE_SUFFIX, n.CITYSCAPES_LABEL_SUFFIX)
    else:  # synthetic, custom
        sub = n.FOLDER_SPLITS[split]
        layout = SplitLayout(root / n.IMAGE_DIR / sub, root / n.LABEL_DIR / sub, IMAGE_EXTENSIONS, ".png")
    for path in (layout.img_dir, layout.ann_dir, layout.split_file):
        if path is not None and not path.exists():
            raise missing_error(name, root, path)
    return layout


def _image_names(layout: SplitLayout) -> list[Path]:
    """Image paths relative to `img_dir`, in the split file's order or sorted."""
    if layout.split_file is not None:
        ids = [line.strip() for line in layout.split_file.read_text().splitlines() if line.strip()]
        return [Path(i + layout.img_suffix) for i in ids]
    if isinstance(layout.img_suffix, tuple):
        found = (p for p in layout.img_dir.rglob("*") if p.suffix.lower() in layout.img_suffix)
    else:
        found = (p for p in layout.img_dir.rglob("*") if p.name.endswith(layout.img_suffix))
    names = sorted(p.relative_to(layout.img_dir) for p in found)
    _refuse_shared_labels(layout, names)
    return names


def _refuse_shared_labels(layout: SplitLayout, names: list[Path]) -> None:
    """Two images with one stem (`x.jpg`, `x.png`) would share a label and train twice."""
    seen: dict[Path, Path] = {}
    for image in names:
        label = label_name(layout, image)
        if label in seen:
            raise DataError(
                f"images {layout.img_dir / seen[label]} and {layout.img_dir / image} have the same name and would "
                f"share the label {layout.ann_dir / label if layout.ann_dir else label}: keep one of them "
                "(remove or rename the other)"
            )
        seen[label] = image


def label_name(layout: SplitLayout, image: Path) -> Path:
    """The label path (relative to `ann_dir`) of an image path relative to `img_dir`."""
    if isinstance(layout.img_suffix, tuple):
        return image.with_suffix(layout.ann_suffix)
    return image.with_name(image.name[: -len(layout.img_suffix)] + layout.ann_suffix)


def pair_files(layout: SplitLayout) -> list[tuple[Path, Path]]:
    """(image, label) relative paths of a labelled split; every file is checked to exist."""
    if layout.ann_dir is None:
        raise ValueError(f"the images in {layout.img_dir} have no labels")
    pairs = []
    for image in _image_names(layout):
        label = label_name(layout, image)
        if layout.split_file is not None and not (layout.img_dir / image).is_file():
            raise FileNotFoundError(f"image {layout.img_dir / image} not found (listed in {layout.split_file})")
        if not (layout.ann_dir / label).is_file():
            raise FileNotFoundError(f"image {layout.img_dir / image} has no label: expected {layout.ann_dir / label}")
        pairs.append((image, label))
    return pairs
