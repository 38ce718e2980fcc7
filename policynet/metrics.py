"""Loss, token budget and metrics of the policy network.

Labels are policy labels (B, h, w) in {0, 1, 255}: 1 = the superpatch holds one class
("shareable"), 0 = several classes, 255 = ignored. Every count skips ignored cells.
"""
from __future__ import annotations

import torch

from segm.data import IGNORE_LABEL
from segm.model.reduction.cts import select_shared
from segm.model.reduction.rules import TokenBudgetError, resolve_token_budget
from segm.model.spec import reference_num_shared
from segm.train.loss import segmentation_loss

SELECTORS = ("policy", "random", "oracle")


def reference_budget(dataset: str, crop: int, patch_size: int = 16) -> int:
    """The dataset's token budget S (shared superpatches per crop), the default of the top-S report."""
    return reference_num_shared(crop, dataset, patch_size)


def check_budget(s: int | None, crop: int, dataset: str, patch_size: int = 16) -> int:
    """`s` (None: the dataset's `reference_budget`) if S superpatches fit a crop×crop crop (the
    segmenter's budget rule), else ValueError."""
    if s is None:
        s = reference_budget(dataset, crop, patch_size)
    grid = (crop // patch_size, crop // patch_size)
    try:
        resolve_token_budget(grid, "policy_net", num_shared=s)
    except TokenBudgetError:
        cells = (grid[0] // 2) * (grid[1] // 2)
        raise ValueError(f"--num-shared {s} does not fit the {cells} superpatches of a {crop}×{crop} crop") from None
    return s


def policy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The segmenter's training loss (`segm.train.loss.segmentation_loss`) on one process: the
    cross-entropy over non-ignored cells (`CrossEntropyLoss(ignore_index=255)`), but 0, not
    NaN, for a batch whose cells are all ignored."""
    return segmentation_loss(logits, labels)[0]


def top_s(scores: torch.Tensor, s: int) -> torch.Tensor:
    """(B, h, w) scores → bool (B, h, w), true at each image's top-s cells."""
    flat = scores.flatten(1)
    if not 0 <= s <= flat.shape[1]:
        raise ValueError(f"token budget S={s} does not fit a policy grid of {flat.shape[1]} cells")
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen.scatter_(1, select_shared(flat, s), True)  # exactly the segmenter's selection
    return chosen.view_as(scores)


class PolicyMeter:
    """Accumulates, on the device, the counts behind accuracy, precision/recall of class 1 and
    the purity of the top-S choice for the policy, a seeded random choice and the oracle.

    Purity = selected cells with label 1 / selected cells not ignored. The oracle ranks cells
    by label (1, then ignored, then 0), the best purity any choice of S cells can reach.
    """

    def __init__(self, s: int, seed: int = 0):
        self.s = s
        self.generator = torch.Generator().manual_seed(seed)
        self.counts: dict[str, torch.Tensor] = {}
        self.images = 0

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.sum()
        self.counts[key] = self.counts[key] + value if key in self.counts else value

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        valid = labels != IGNORE_LABEL
        pos = labels == 1
        pred = logits.argmax(1) == 1
        self._add("cells", valid)
        self._add("correct", valid & (pred == pos))
        self._add("tp", valid & pred & pos)
        self._add("pred_pos", valid & pred)
        self._add("pos", pos)
        # Random draws on the CPU generator so the baseline is the same on every device.
        noise = torch.rand(labels.shape, generator=self.generator).to(labels.device)
        scores = {
            "policy": logits.float().softmax(1)[:, 1],
            "random": noise,
            "oracle": torch.where(pos, 2, valid.logical_not().long()).float(),
        }
        for name, score in scores.items():
            chosen = top_s(score, self.s)
            self._add(f"{name}_pure", chosen & pos)
            self._add(f"{name}_counted", chosen & valid)
        self.images += labels.shape[0]

    def compute(self) -> dict:
        if not self.counts:
            raise ValueError("no batches were evaluated")
        c = dict(zip(self.counts, torch.stack(list(self.counts.values())).tolist()))  # one sync

        def ratio(a, b):
            return c[a] / c[b] if c[b] else float("nan")

        out = {
            "images": self.images,
            "cells": c["cells"],
            "accuracy": ratio("correct", "cells"),
            "precision": ratio("tp", "pred_pos"),
            "recall": ratio("tp", "pos"),
            "shareable_fraction": ratio("pos", "cells"),
            "num_shared": self.s,
        }
        for name in SELECTORS:
            out[f"top_s_{name}"] = ratio(f"{name}_pure", f"{name}_counted")
        return out
