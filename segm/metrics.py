"""Dataset-level mIoU with the semantics of mmseg 0.x `mean_iou` (docs/DESIGN.md, "Evaluation").

Per-class intersection, union, predicted area and label area are counted on the
prediction's device with one `bincount` per image batch, accumulated over the whole
dataset as int64, summed across processes in memory, and turned into the reported
percentages on the host:

    acc = IoUAccumulator(n_cls, device=device)
    for pred, label in ...:
        acc.update(pred, label)
    acc.all_reduce()
    scores = acc.compute()   # pixel_accuracy, mean_accuracy, mean_iou, cat_iou
"""
from __future__ import annotations

import math

import numpy as np
import torch

from segm.utils.distributed import all_reduce_sum

__all__ = ["intersect_and_union", "compute_metrics", "per_class_table", "IoUAccumulator"]


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, n_cls: int, ignore_index: int = 255):
    """Per-class (intersection, union, pred area, label area), int64 tensors of shape (n_cls,).

    `pred` and `label` are integer tensors of the same shape (any number of images).
    Pixels whose label is `ignore_index` are dropped. As with mmseg's `torch.histc`
    counting, values outside [0, n_cls) in either map are not counted in that map's
    area (and never count as an intersection).
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
    if pred.is_floating_point() or label.is_floating_point():
        raise TypeError("intersect_and_union expects integer class maps (argmax the logits first)")
    pred = pred.reshape(-1).long()
    label = label.to(pred.device).reshape(-1).long()
    # Out-of-range values go to an extra class K, ignored pixels to one last bin; both
    # are dropped below. No boolean indexing, so no host-device sync.
    k1 = n_cls + 1
    pred = torch.where((pred >= 0) & (pred < n_cls), pred, n_cls)
    index = torch.where((label >= 0) & (label < n_cls), label, n_cls) * k1 + pred
    index = torch.where(label == ignore_index, k1 * k1, index)
    confusion = torch.bincount(index, minlength=k1 * k1 + 1)[: k1 * k1].view(k1, k1)
    area_intersect = confusion.diagonal()[:n_cls]
    area_label = confusion.sum(1)[:n_cls]
    area_pred = confusion.sum(0)[:n_cls]
    area_union = area_pred + area_label - area_intersect
    return area_intersect, area_union, area_pred, area_label


def _pct(x: float) -> float:
    # Same rounding as the reference: np.round(value * 100, 2).
    return float(np.round(x * 100, 2))


def compute_metrics(area_intersect, area_union, area_pred, area_label) -> dict:
    """Reported scores from accumulated areas (tensors or arrays of shape (n_cls,)).

    `pixel_accuracy` = 100·ΣI/Σlabel, `mean_accuracy` = 100·nanmean(I/label),
    `mean_iou` = 100·nanmean(I/U), each rounded to 2 decimals; `cat_iou` is the list of
    per-class IoU in % (2 decimals), `nan` for a class absent from both prediction and
    label (zero union), which nanmean skips; `cat_acc` the per-class accuracy (`nan` for a
    class absent from the labels). `area_pred` is accepted for completeness.
    """
    def f64(a):
        return torch.as_tensor(a).detach().cpu().double().numpy()

    inter, union, label = f64(area_intersect), f64(area_union), f64(area_label)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
        acc = inter / label
        aacc = inter.sum() / label.sum()

    def nanmean(a):
        return math.nan if np.isnan(a).all() else float(np.nanmean(a))

    return {
        "pixel_accuracy": _pct(float(aacc)),
        "mean_accuracy": _pct(nanmean(acc)),
        "mean_iou": _pct(nanmean(iou)),
        "cat_iou": [_pct(float(v)) for v in iou],
        "cat_acc": [_pct(float(v)) for v in acc],
    }


def per_class_table(class_names, scores: dict) -> str:
    """IoU and accuracy per class, with the class names, as mmseg's evaluation prints them."""
    from prettytable import PrettyTable

    table = PrettyTable(["Class", "IoU", "Acc"])
    table.align["Class"] = "l"
    for name, iou, acc in zip(class_names, scores["cat_iou"], scores["cat_acc"]):
        table.add_row([name, f"{iou:.2f}", f"{acc:.2f}"])
    return table.get_string()


class IoUAccumulator:
    """Accumulates per-class areas over a dataset (and over processes)."""

    def __init__(self, n_cls: int, ignore_index: int = 255, device="cpu"):
        if n_cls < 1:
            raise ValueError(f"n_cls must be >= 1, got {n_cls}")
        self.n_cls = n_cls
        self.ignore_index = ignore_index
        # Rows: intersection, union, pred area, label area.
        self.areas = torch.zeros(4, n_cls, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.areas.device

    def reset(self) -> None:
        self.areas.zero_()

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add a prediction / label pair (class maps, same shape, one or many images)."""
        areas = intersect_and_union(pred.to(self.device), label, self.n_cls, self.ignore_index)
        self.areas += torch.stack(areas)

    def all_reduce(self) -> None:
        """Sum the areas over all processes (no-op without an initialised process group)."""
        all_reduce_sum(self.areas)

    def compute(self) -> dict:
        return compute_metrics(*self.areas)
