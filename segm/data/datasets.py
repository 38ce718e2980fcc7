"""Torch datasets over mmseg 0.30 datasets and pipelines (SPEC §7.1).

Train items: {'im': float (3, crop, crop), 'segmentation': long (crop, crop)} (ignore 255).
Val/test items: {'im': [float (3, h, w) per view], 'im_metas': [dict per view],
'segmentation': long (H, W) at the original size in train label space, 'ori_filename': str}.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import pipelines
from .base import (  # noqa: F401  (IMAGE_EXTENSIONS re-exported)
    IGNORE_LABEL,
    IMAGE_EXTENSIONS,
    MAX_RATIO,
    PREPARE_COMMANDS,
    canonical_name,
    dataset_info,
    default_root,
)
from .mmseg_compat import ADE20KDataset, CityscapesDataset, CustomDataset, PascalContextDataset

TRAIN_SPLITS = ("train",)
_FOLDER_SPLITS = {"train": "training", "val": "validation"}


class _FolderDataset(CustomDataset):
    """ADE-like folder: any common image extension, label `<stem>.png` in the annotations dir."""

    def load_annotations(self, img_dir, img_suffix, ann_dir, seg_map_suffix, split):
        img_dir = Path(img_dir)
        infos = []
        for path in sorted(p for p in img_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
            rel = path.relative_to(img_dir)
            info = dict(filename=str(rel))
            if ann_dir is not None:
                seg_map = rel.with_suffix(".png")
                if not (Path(ann_dir) / seg_map).is_file():
                    raise FileNotFoundError(
                        f"image {path} has no label: expected {Path(ann_dir) / seg_map}"
                    )
                info["ann"] = dict(seg_map=str(seg_map))
            infos.append(info)
        return infos


def _missing(name: str, root: Path, expected: Path) -> FileNotFoundError:
    missing = "" if expected == root else f" (missing {expected})"
    if name == "custom":
        return FileNotFoundError(
            f"custom dataset folder {root} not found{missing}: --data-root DIR needs "
            "images/{training,validation} and annotations/{training,validation}"
        )
    return FileNotFoundError(f"{name} dataset not found at {root}{missing}: run `{PREPARE_COMMANDS[name]}`")


def _mmseg_kwargs(name: str, root: Path, split: str) -> tuple[type, dict]:
    """The mmseg dataset class and its folder arguments for one split."""
    def need(path: Path) -> str:
        if not path.exists():
            raise _missing(name, root, path)
        return str(path)

    if name == "ade20k":
        base = root / "ADEChallengeData2016"
        if split == "test":
            return ADE20KDataset, dict(img_dir=need(root / "release_test" / "testing"))
        sub = {"train": "training", "val": "validation"}[split]
        return ADE20KDataset, dict(img_dir=need(base / "images" / sub), ann_dir=need(base / "annotations" / sub))
    if name == "pascal_context":
        if split == "test":
            raise ValueError("Pascal Context has no test split: use split='val'")
        base = root / "VOCdevkit" / "VOC2010"
        return PascalContextDataset, dict(
            img_dir=need(base / "JPEGImages"),
            ann_dir=need(base / "SegmentationClassContext"),
            split=need(base / "ImageSets" / "SegmentationContext" / f"{split}.txt"),
        )
    if name == "cityscapes":
        return CityscapesDataset, dict(
            img_dir=need(root / "leftImg8bit" / split), ann_dir=need(root / "gtFine" / split)
        )
    # synthetic, custom
    if split not in _FOLDER_SPLITS:
        raise ValueError(f"the {name} dataset has the splits train and val, not {split!r}")
    sub = _FOLDER_SPLITS[split]
    return _FolderDataset, dict(img_dir=need(root / "images" / sub), ann_dir=need(root / "annotations" / sub))


def _plain_meta(meta: dict) -> dict:
    """mmseg meta -> plain Python values; shapes as (H, W)."""
    out = {}
    for key, value in meta.items():
        if key in ("ori_shape", "img_shape", "pad_shape"):
            value = tuple(int(v) for v in value[:2])
        elif key == "scale_factor":
            value = tuple(float(v) for v in np.atleast_1d(value))
        elif key == "flip":
            value = bool(value)
        elif key == "img_norm_cfg":
            value = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in value.items()}
        out[key] = value
    return out


class SegmentationDataset(Dataset):
    """One split of a dataset, wrapping an mmseg dataset and its pipeline."""

    def __init__(self, name: str, split: str, *, im_size: int, crop_size: int, normalization: str,
                 data_root=None, classes_file=None, multiscale: bool = False):
        name = canonical_name(name)
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}: choose train, val or test")
        if name == "custom" and data_root is None:
            raise ValueError("the custom dataset needs its folder: pass --data-root DIR (data_root=...)")
        root = Path(data_root) if data_root is not None else default_root(name)
        if not root.is_dir():
            raise _missing(name, root, root)
        self.name, self.split, self.root = name, split, root
        self.info = dataset_info(name, data_root=root, classes_file=classes_file)
        self.train = split in TRAIN_SPLITS
        self.multiscale = multiscale
        max_ratio = MAX_RATIO[name]
        if self.train:
            pipeline = pipelines.train_pipeline(
                im_size=im_size, crop_size=crop_size, max_ratio=max_ratio, normalization=normalization,
                n_cls=self.info.n_cls, reduce_zero_label=self.info.reduce_zero_label,
                ignore_value=self.info.label_ignore_value,
            )
        else:
            pipeline = pipelines.test_pipeline(
                im_size=im_size, max_ratio=max_ratio, normalization=normalization, multiscale=multiscale
            )
        cls, kwargs = _mmseg_kwargs(name, root, split)
        if cls is _FolderDataset:
            kwargs.update(classes=list(self.info.class_names), palette=self.info.palette,
                          reduce_zero_label=self.info.reduce_zero_label)
        self.dataset = cls(pipeline=pipeline, test_mode=not self.train, **kwargs)
        if len(self.dataset) == 0:
            hint = "" if name == "custom" else f": run `{PREPARE_COMMANDS[name]}`"
            raise FileNotFoundError(f"no images found in {self.dataset.img_dir} ({name} {split} split){hint}")
        self.has_labels = self.dataset.ann_dir is not None

    def __len__(self) -> int:
        return len(self.dataset)

    def label_path(self, idx: int) -> str:
        return str(Path(self.dataset.ann_dir) / self.dataset.img_infos[idx]["ann"]["seg_map"])

    def image_path(self, idx: int) -> str:
        return str(Path(self.dataset.img_dir) / self.dataset.img_infos[idx]["filename"])

    def load_label(self, idx: int) -> torch.Tensor:
        """Original-size label in train label space, long (H, W)."""
        seg = pipelines.read_label(
            self.label_path(idx), self.info.n_cls, reduce_zero_label=self.info.reduce_zero_label,
            ignore_value=self.info.label_ignore_value,
        )
        return torch.from_numpy(seg).long()

    def __getitem__(self, idx: int) -> dict:
        data = self.dataset[idx]
        if self.train:
            return {
                "im": data["img"].data,
                "segmentation": data["gt_semantic_seg"].data.squeeze(0).long(),
            }
        metas = [_plain_meta(m.data) for m in data["img_metas"]]
        out = {"im": [v.contiguous() for v in data["img"]], "im_metas": metas, "ori_filename": metas[0]["ori_filename"]}
        if self.has_labels:
            seg = self.load_label(idx)
            if tuple(seg.shape) != metas[0]["ori_shape"]:
                raise pipelines.DataError(
                    f"label {self.label_path(idx)} is {seg.shape[1]}x{seg.shape[0]} but its image "
                    f"{self.image_path(idx)} is {metas[0]['ori_shape'][1]}x{metas[0]['ori_shape'][0]}"
                )
            out["segmentation"] = seg
        return out


def build_dataset(name: str, split: str, *, im_size: int, crop_size: int, normalization: str,
                  data_root=None, classes_file=None, multiscale: bool = False) -> SegmentationDataset:
    """A torch Dataset for one split (items described in the module docstring)."""
    return SegmentationDataset(
        name, split, im_size=im_size, crop_size=crop_size, normalization=normalization,
        data_root=data_root, classes_file=classes_file, multiscale=multiscale,
    )


def val_collate(batch: list) -> dict:
    """Collate for val/test loaders with batch size 1: the single item, unchanged.

    Views keep their (3, h, w) shapes (sizes differ between views), metas stay plain dicts.
    """
    if len(batch) != 1:
        raise ValueError(f"val_collate expects batch_size=1 (views differ in size), got {len(batch)}")
    return batch[0]


__all__ = ["SegmentationDataset", "build_dataset", "val_collate", "IGNORE_LABEL"]
