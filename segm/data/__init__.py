"""Datasets, pipelines and policy labels (see docs/INTERFACES.md).

`build_dataset`, `SegmentationDataset` and `val_collate` are imported lazily so that
`policy_labels`, `dataset_info` and `segm.data.io` (read_image, read_label) do not pay for
importing mmcv/mmseg (about 3 s).
"""
from segm.utils.lazy import lazy_exports

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

__getattr__ = lazy_exports(__name__, {
    "SegmentationDataset": "segm.data.datasets",
    "build_dataset": "segm.data.datasets",
    "val_collate": "segm.data.datasets",
    "DataError": "segm.data.io",
})


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
