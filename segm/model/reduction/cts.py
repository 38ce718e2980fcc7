"""Content-aware Token Sharing as pure functions on tensors (docs/DESIGN.md, "Token geometry and order");
the reducer that puts them behind the seam is `segm.model.reduction.cts_reducer`.

Geometry: the base grid has Gh×Gw patches (N = Gh·Gw); a superpatch is the fixed,
even-aligned 2×2 group of base patches, so the superpatch grid is (Gh/2)×(Gw/2).
S superpatches are shared per image, U = N − 4S base patches are not, and the ViT sees
T = U + S patch tokens in the order: non-shared (raster over the base grid, covered cells
skipped), then shared (raster over the superpatch grid).

Everything here works on the input's device, is vectorised over the batch, has static
output shapes (U and S are Python ints) and makes no host-device synchronisation.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from segm.model.reduction.base import TokenMap, cells_to_grid, grid_to_tokens, unmerge
from segm.model.reduction.ranking import descending_rank, true_indices
from segm.model.reduction.rules import TokenBudgetError, resolve_token_budget  # noqa: F401 (CTS's budget rule)


class TokenLayout(NamedTuple):
    """Where every token comes from, for one batch.

    base_idx (B, U): flat base-grid index of each non-shared token, ascending.
    shared_idx (B, S): flat superpatch-grid index of each shared token, ascending.
    token_of_cell (B, N): the token (0..T−1) that covers each base cell; drives unsharing.
    grid: (Gh, Gw).
    """

    base_idx: torch.Tensor
    shared_idx: torch.Tensor
    token_of_cell: torch.Tensor
    grid: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.base_idx.shape[1] + self.shared_idx.shape[1]

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask1 (B, Gh, Gw) non-shared base patches, mask2 (B, Gh/2, Gw/2) shared superpatches)."""
        gh, gw = self.grid
        b = self.base_idx.shape[0]
        dev = self.base_idx.device
        mask1 = torch.zeros(b, gh * gw, dtype=torch.bool, device=dev)
        mask1.scatter_(1, self.base_idx, True)
        mask2 = torch.zeros(b, (gh // 2) * (gw // 2), dtype=torch.bool, device=dev)
        mask2.scatter_(1, self.shared_idx, True)
        return mask1.view(b, gh, gw), mask2.view(b, gh // 2, gw // 2)

    def policy_code(self) -> torch.Tensor:
        """(B, T, 3) float `[scale, row, col]` in base-grid coordinates (reference format)."""
        gh, gw = self.grid
        r1, c1 = self.base_idx // gw, self.base_idx % gw
        w2 = gw // 2
        r2, c2 = 2 * (self.shared_idx // w2), 2 * (self.shared_idx % w2)
        scale = torch.cat([torch.ones_like(r1), torch.full_like(r2, 2)], dim=1)
        return torch.stack([scale, torch.cat([r1, r2], 1), torch.cat([c1, c2], 1)], dim=-1).float()


def no_sharing_layout(batch: int, grid: tuple[int, int], device) -> TokenLayout:
    gh, gw = grid
    n = gh * gw
    idx = torch.arange(n, device=device).expand(batch, n)
    return TokenLayout(idx, idx[:, :0], idx, grid)


def select_shared(scores: torch.Tensor, num_shared: int) -> torch.Tensor:
    """The S best-scored superpatches per image: scores (B, n2) → indices (B, S) in raster order.
    Ties go to the lower raster index (stable sort)."""
    if torch.compiler.is_exporting():
        return true_indices(descending_rank(scores) < num_shared, num_shared)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :num_shared].sort(dim=1).values


def layout_from_shared(shared_idx: torch.Tensor, grid: tuple[int, int]) -> TokenLayout:
    """The token layout of given shared superpatches (B, S), ascending; equal to what
    `layout_from_scores` builds after its selection, with masks and cumulative sums, no sort."""
    gh, gw = grid
    b, num_shared, h2, w2 = shared_idx.shape[0], shared_idx.shape[1], gh // 2, gw // 2
    shared = torch.zeros(b, h2 * w2, dtype=torch.bool, device=shared_idx.device).scatter(1, shared_idx, True)

    def per_cell(x):  # (B, h2·w2) per superpatch → (B, Gh·Gw) per base cell
        return x.view(b, h2, 1, w2, 1).expand(b, h2, 2, w2, 2).reshape(b, gh * gw)

    is_base = per_cell(shared).logical_not()
    u = gh * gw - 4 * num_shared
    token_of_cell = torch.where(is_base, is_base.cumsum(1) - 1, per_cell(shared.cumsum(1) - 1 + u))
    return TokenLayout(true_indices(is_base, u), shared_idx, token_of_cell, grid)


def layout_from_scores(scores: torch.Tensor, num_shared: int, grid: tuple[int, int]) -> TokenLayout:
    """Top-S superpatch selection and the resulting token layout.

    scores (B, Gh/2, Gw/2) or (B, Gh·Gw/4): higher = more shareable (for the policy net,
    softmax(logits)[:, 1]). There is no threshold: every image shares exactly S.
    Ties are broken towards the lower raster index (stable sort).
    """
    gh, gw = grid
    b = scores.shape[0]
    scores = scores.reshape(b, -1).float()
    n2 = scores.shape[1]
    if n2 != (gh // 2) * (gw // 2):
        raise ValueError(f"policy scores cover {n2} superpatches, the {gh}×{gw} grid has {(gh // 2) * (gw // 2)}")
    dev = scores.device
    if num_shared == 0:
        return no_sharing_layout(b, grid, dev)
    shared_idx = select_shared(scores, num_shared)
    if torch.compiler.is_exporting():
        return layout_from_shared(shared_idx, grid)

    # Base cells covered by each shared superpatch: its top-left cell + {0, 1, Gw, Gw+1}.
    w2 = gw // 2
    top_left = 2 * (shared_idx // w2) * gw + 2 * (shared_idx % w2)
    k = torch.arange(4, device=dev)  # built on the device: a tensor from a list would wait for the GPU
    offsets = k % 2 + (k // 2) * gw  # 0, 1, Gw, Gw + 1
    covered = (top_left.unsqueeze(-1) + offsets).reshape(b, -1)  # (B, 4S)

    n = gh * gw
    is_base = torch.ones(b, n, dtype=torch.bool, device=dev)
    is_base.scatter_(1, covered, False)
    # Stable sort of the keys (0 = base, 1 = covered) lists the base cells first, in raster order.
    u = n - 4 * num_shared
    base_idx = torch.sort(is_base.logical_not().to(torch.uint8), dim=1, stable=True).indices[:, :u]

    token_of_cell = torch.empty(b, n, dtype=torch.long, device=dev)
    token_of_cell.scatter_(1, base_idx, torch.arange(u, device=dev).expand(b, u))
    shared_tokens = (u + torch.arange(num_shared, device=dev)).repeat_interleave(4).expand(b, -1)
    token_of_cell.scatter_(1, covered, shared_tokens)
    return TokenLayout(base_idx, shared_idx, token_of_cell, grid)


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B or 1, M, D), idx (B, K) → (B, K, D)."""
    if x.shape[0] != idx.shape[0]:
        x = x.expand(idx.shape[0], -1, -1)
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def mix_tokens(base: torch.Tensor, pooled: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Selects the T = U + S tokens: base (B|1, N, D) at `base_idx`, then pooled (B|1, N/4, D)
    at `shared_idx`. `pooled` holds, per superpatch, the value computed on its 2×2-average-pooled
    block (the embedded pooled image for patches; the mean of four for position embeddings)."""
    if layout.shared_idx.shape[1] == 0 and layout.base_idx.shape[1] == base.shape[1]:
        return base.expand(layout.base_idx.shape[0], -1, -1)  # no sharing: identity
    return torch.cat([_gather_tokens(base, layout.base_idx), _gather_tokens(pooled, layout.shared_idx)], 1)


def patch_pixels(im: torch.Tensor, idx: torch.Tensor, patch: int) -> torch.Tensor:
    """The pixels of the patches at raster indices idx (B, K) of the (H/p, W/p) grid of im
    (B, C, H, W): (B, K, C·p·p), each flattened as (C, p, p), the order of a patch-embedding
    conv's weight. Only the selected patches are copied."""
    b, c, h, w = im.shape
    gw = w // patch
    cells = im.reshape(b, c, h // patch, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    rows = torch.arange(b, device=im.device).unsqueeze(1)
    return cells[rows, idx // gw, idx % gw].flatten(2)


def mixed_patches(im: torch.Tensor, layout: TokenLayout, patch: int) -> torch.Tensor:
    """Pixels of the T = U + S mixed-scale tokens: the U non-shared patches, then
    per shared superpatch its 2p×2p block average-pooled to p×p. (B, T, C·p·p), token order.
    Embedding these with the patch conv as a matrix product equals embedding the full and the
    pooled image and selecting tokens (`mix_tokens`), without computing the unused 4S + N/4 − S."""
    pooled = F.avg_pool2d(im, 2)  # == the reference's bilinear ×0.5 with align_corners=False
    return torch.cat([patch_pixels(im, layout.base_idx, patch), patch_pixels(pooled, layout.shared_idx, patch)], 1)


def pool_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-superpatch mean of tokens on a grid: (B, N, D) → (B, N/4, D). For position
    embeddings this is the mean of the four cells."""
    b, _, d = x.shape
    gh, gw = grid
    g = x.transpose(1, 2).reshape(b, d, gh, gw)
    return grid_to_tokens(F.avg_pool2d(g, 2))


def layout_map(layout: TokenLayout, record=None) -> TokenMap:
    """The layout as the seam's token map (identity when nothing is shared)."""
    n = layout.grid[0] * layout.grid[1]
    identity = layout.shared_idx.shape[1] == 0 and layout.num_tokens == n
    return TokenMap(layout.token_of_cell, layout.grid, layout.num_tokens, identity=identity, record=record)


def unshare(token_scores: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Unsharing: (B, T, K) per-token scores → (B, K, Gh, Gw), each shared token's
    scores written to its 4 cells. The result is a channels-last view (no copy)."""
    return cells_to_grid(unmerge(token_scores, layout_map(layout)), layout.grid)
