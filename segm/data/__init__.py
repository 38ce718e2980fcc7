"""Datasets, pipelines and policy labels (see docs/INTERFACES.md).

`build_dataset`, `SegmentationDataset` and `val_collate` are imported lazily so that
`policy_labels`, `dataset_info` and `segm.data.io` (read_image, read_label) do not pay for
importing mmcv/mmseg (about 3 s).
"""
import importlib

from .base import (
    DATASET_NAMES,
    IGNORE_LABEL,
    MAX_RATIO,
    STATS,
    DatasetInfo,
    canonical_name,
    dataset_info,
    normalization_stats,
)
from .policy_labels import PolicyLabelRules, policy_labels, rules_for

_LAZY = {
    "SegmentationDataset": ".datasets",
    "build_dataset": ".datasets",
    "val_collate": ".datasets",
    "DataError": ".io",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATASET_NAMES",
    "IGNORE_LABEL",
    "MAX_RATIO",
    "STATS",
    "DataError",
    "DatasetInfo",
    "PolicyLabelRules",
    "SegmentationDataset",
    "build_dataset",
    "canonical_name",
    "dataset_info",
    "normalization_stats",
    "policy_labels",
    "rules_for",
    "val_collate",
]
