"""Orderings that reducers select tokens by, exact and exportable.

ONNX has no stable sort, so while a graph is exported (segm.export) the selections rank
without sorting: `descending_rank` gives each score its place in
`torch.sort(descending=True, stable=True)` exactly, with n² comparisons (n = 256 superpatches
at 512 px, 576 at 768); eager code keeps the sort, which is 3–10× faster on the CPU.
"""
from __future__ import annotations

import torch


def descending_rank(scores: torch.Tensor) -> torch.Tensor:
    """(B, n) → (B, n) int64: how many scores beat each one: greater, or equal with a lower
    index; NaN beats every number (as in torch.sort)."""
    idx = torch.arange(scores.shape[1], device=scores.device)
    lower = idx.unsqueeze(0) < idx.unsqueeze(1)  # [i, j]: j < i
    s_i, s_j = scores.unsqueeze(2), scores.unsqueeze(1)
    nan = torch.isnan(scores)
    nan_beats = nan.unsqueeze(1) & (lower | ~nan.unsqueeze(2))
    return ((s_j > s_i) | ((s_j == s_i) & lower) | nan_beats).sum(2)


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """(B, n) → (B, n) the indices of `torch.sort(scores, descending=True, stable=True)`; while
    exporting, the rank's inverse permutation (a scatter, no sort)."""
    if torch.compiler.is_exporting():
        rank = descending_rank(scores)
        return torch.empty_like(rank).scatter_(1, rank, torch.arange(rank.shape[1], device=rank.device).expand_as(rank))
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def true_indices(mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n) bool with exactly k true per row → (B, k) their indices, ascending (top-k of
    distinct integer keys: exact whatever the backend's tie rule)."""
    n = mask.shape[1]
    key = torch.where(mask, n - torch.arange(n, device=mask.device), 0)
    return torch.topk(key, k, dim=1).indices
