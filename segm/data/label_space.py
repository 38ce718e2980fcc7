"""Predictions in a dataset's own label space: the values its annotation files and its test
server use, which are not always the train labels the model predicts.

- ADE20K stores class i as i + 1 (0 is "other", dropped by `reduce_zero_label` on loading):
  train label i is written as i + 1, so the server gets 1..150.
- Cityscapes is trained on trainIds 0..18, but its server reads label ids (road 7, car 26, ...):
  train ids go back through the official label table (`segm.data.cityscapes_labels.LABELS`,
  the table the preparation converts polygons with).
- Pascal-Context (60 classes, background 0), synthetic and custom datasets keep train labels.

The ignore label 255 becomes the file's "unlabelled" value (ADE20K and Cityscapes: 0).
"""
from __future__ import annotations

import functools

import numpy as np

from segm.data.base import IGNORE_LABEL, canonical_name, dataset_info

__all__ = ["to_label_space", "label_space_table"]


@functools.lru_cache(maxsize=None)
def label_space_table(dataset_name: str | None) -> np.ndarray:
    """(256,) int16: the file value of each train label, -1 where a train label has none."""
    name = canonical_name(dataset_name) if dataset_name is not None else None
    if name == "ade20k":
        n_cls = dataset_info(name).n_cls
        table = np.full(256, -1, dtype=np.int16)
        table[:n_cls] = np.arange(1, n_cls + 1)
        table[IGNORE_LABEL] = 0
    elif name == "cityscapes":
        from segm.data.cityscapes_labels import LABELS  # the official table, in one place

        table = np.full(256, -1, dtype=np.int16)
        for label_id, train_id in LABELS.values():
            if 0 <= train_id < IGNORE_LABEL:
                table[train_id] = label_id
        table[IGNORE_LABEL] = LABELS["unlabeled"][0]
    else:
        table = np.arange(256, dtype=np.int16)
    table.flags.writeable = False
    return table


def to_label_space(pred, dataset_name: str | None) -> np.ndarray:
    """(H, W) train labels (array or tensor) -> (H, W) uint8 in `dataset_name`'s label space
    (None: unchanged). Raises ValueError for a label the dataset does not have."""
    pred = np.asarray(pred.cpu() if hasattr(pred, "cpu") else pred)
    if pred.size and (pred.min() < 0 or pred.max() > 255):
        raise ValueError(f"labels must be in 0..255 to be written as an 8-bit PNG, got {pred.min()}..{pred.max()}")
    table = label_space_table(dataset_name)
    out = table[pred.astype(np.int64)]
    if out.size and out.min() < 0:
        bad = int(pred[out < 0].flat[0])
        raise ValueError(f"label {bad} is not a class of dataset {dataset_name}")
    return out.astype(np.uint8)
