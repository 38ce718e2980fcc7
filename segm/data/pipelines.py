"""mmseg 0.x pipelines as dict configs, with the reference values (docs/DESIGN.md, "Training
recipe" and "Evaluation").

The two loading ops are checked variants of mmseg's `LoadImageFromFile` and
`LoadAnnotations`: identical results, but a missing, corrupt or out-of-range file ends with
an error naming it (mmseg would fail later on a `None` image or wrap labels silently).
"""
from __future__ import annotations

import os.path as osp

import numpy as np

from segm.eval.window import view_plan

from .base import IGNORE_LABEL, normalization_stats
from .io import DataError, check_same_size, read_image, read_label  # noqa: F401  (re-exported)
from .mmseg_compat import PIPELINES


@PIPELINES.register_module(force=True)
class CheckedLoadImageFromFile:
    """mmseg `LoadImageFromFile` (cv2, color, uint8, BGR) with clear errors and `read_image`'s
    rule (stored pixel order, 16-bit and float images scaled)."""

    def __call__(self, results):
        if results.get("img_prefix") is not None:
            filename = osp.join(results["img_prefix"], results["img_info"]["filename"])
        else:
            filename = results["img_info"]["filename"]
        img = read_image(filename, channel_order="bgr")
        results["filename"] = filename
        results["ori_filename"] = results["img_info"]["filename"]
        results["img"] = img
        results["img_shape"] = img.shape
        results["ori_shape"] = img.shape
        results["pad_shape"] = img.shape
        results["scale_factor"] = 1.0
        results["img_norm_cfg"] = dict(
            mean=np.zeros(3, dtype=np.float32), std=np.ones(3, dtype=np.float32), to_rgb=False
        )
        return results


@PIPELINES.register_module(force=True)
class CheckedLoadAnnotations:
    """mmseg `LoadAnnotations` (pillow, reduce_zero_label) with value and size checks."""

    def __init__(self, n_cls, reduce_zero_label=False, ignore_value=IGNORE_LABEL):
        self.n_cls = n_cls
        self.reduce_zero_label = reduce_zero_label
        self.ignore_value = ignore_value

    def __call__(self, results):
        if results.get("seg_prefix") is not None:
            filename = osp.join(results["seg_prefix"], results["ann_info"]["seg_map"])
        else:
            filename = results["ann_info"]["seg_map"]
        seg = read_label(
            filename, self.n_cls, reduce_zero_label=self.reduce_zero_label, ignore_value=self.ignore_value
        )
        if "img" in results:
            check_same_size(results.get("filename"), results["img"].shape, filename, seg.shape)
        results["gt_semantic_seg"] = seg
        results["seg_fields"].append("gt_semantic_seg")
        return results


def _norm_cfg(normalization: str) -> dict:
    stats = normalization_stats(normalization)
    return dict(type="Normalize", mean=stats["mean"], std=stats["std"], to_rgb=True)


def train_pipeline(*, im_size, crop_size, max_ratio, normalization, n_cls, reduce_zero_label,
                   ignore_value=IGNORE_LABEL) -> list:
    crop = (crop_size, crop_size)
    return [
        dict(type="CheckedLoadImageFromFile"),
        dict(type="CheckedLoadAnnotations", n_cls=n_cls, reduce_zero_label=reduce_zero_label,
             ignore_value=ignore_value),
        dict(type="Resize", img_scale=(max_ratio * im_size, im_size), ratio_range=(0.5, 2.0)),
        dict(type="RandomCrop", crop_size=crop, cat_max_ratio=0.75),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PhotoMetricDistortion"),
        _norm_cfg(normalization),
        dict(type="Pad", size=crop, pad_val=0, seg_pad_val=IGNORE_LABEL),
        dict(type="DefaultFormatBundle"),
        dict(type="Collect", keys=["img", "gt_semantic_seg"]),
    ]


def test_pipeline(*, im_size, max_ratio, normalization, multiscale=False) -> list:
    """Single scale: one view at (max_ratio·im_size, im_size), no flip; multi-scale: 12 views
    (`segm.eval.window.view_plan`)."""
    ratios, mirrored = view_plan(multiscale)
    aug = dict(
        type="MultiScaleFlipAug",
        img_scale=(max_ratio * im_size, im_size),
        img_ratios=ratios,
        flip=mirrored,
        transforms=[
            dict(type="Resize", keep_ratio=True),
            dict(type="RandomFlip"),
            _norm_cfg(normalization),
            dict(type="ImageToTensor", keys=["img"]),
            dict(type="Collect", keys=["img"]),
        ],
    )
    return [dict(type="CheckedLoadImageFromFile"), aug]
