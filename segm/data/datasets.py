"""Torch datasets over mmseg 0.30 datasets and pipelines (docs/DESIGN.md, "Training recipe").

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
from .base import IGNORE_LABEL, MAX_RATIO, PREPARE_COMMANDS, canonical_name, dataset_info
from .layout import SplitLayout, check_split, dataset_root, pair_files, split_layout
from .mmseg_compat import ADE20KDataset, CityscapesDataset, CustomDataset, PascalContextDataset

TRAIN_SPLITS = ("train",)
# These list their own files, with suffixes equal to the layout's (tests/test_data.py checks it).
_MMSEG_CLASSES = {"ade20k": ADE20KDataset, "pascal_context": PascalContextDataset, "cityscapes": CityscapesDataset}


class _FolderDataset(CustomDataset):
    """A synthetic or custom folder: any common image extension, label `<stem>.png`."""

    def __init__(self, layout: SplitLayout, **kwargs):
        self.layout = layout  # read by load_annotations, which CustomDataset.__init__ calls
        super().__init__(img_dir=str(layout.img_dir), ann_dir=str(layout.ann_dir), **kwargs)

    def load_annotations(self, img_dir, img_suffix, ann_dir, seg_map_suffix, split):
        return [dict(filename=str(image), ann=dict(seg_map=str(label))) for image, label in pair_files(self.layout)]


def _mmseg_kwargs(name: str, root: Path, split: str) -> tuple[type, dict]:
    """The mmseg dataset class and its folder arguments for one split."""
    layout = split_layout(name, root, split)
    if name not in _MMSEG_CLASSES:
        return _FolderDataset, dict(layout=layout)
    kwargs = dict(img_dir=str(layout.img_dir))
    if layout.ann_dir is not None:
        kwargs["ann_dir"] = str(layout.ann_dir)
    if layout.split_file is not None:
        kwargs["split"] = str(layout.split_file)
    return _MMSEG_CLASSES[name], kwargs


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
        check_split(name, split)
        root = dataset_root(name, data_root)
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
            pipelines.check_same_size(self.image_path(idx), metas[0]["ori_shape"], self.label_path(idx), seg.shape)
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
