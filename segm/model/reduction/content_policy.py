"""Training-free content policies: superpatch scores straight from the image.

Each score maps a normalised image batch (B, 3, H, W), H and W multiples of 32, to
(B, (H/32)·(W/32)) in raster order over the superpatch grid, higher = more shareable, ready
for `segm.model.reduction.cts.layout_from_scores`. A block of one colour scores exactly 0, the maximum;
everything else scores below it. Ties are left to `cts.select_shared` (lower raster index first).

All scores are computed in float32 (autocast is switched off inside), on the input's device,
vectorised over the batch, with static shapes and no host-device synchronisation. Scoring a
batch gives exactly the scores of each image alone.
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F

BLOCK = 32  # a superpatch: 2×2 patches of 16 px


def _blocks(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, H, W) → (B, C, H/k, k, W/k, k), one k×k block per (dim 2, dim 4) position."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // k, k, w // k, k)


def _fp32(x: torch.Tensor):
    """Switches autocast off (scores are float32 under any autocast) where the device has one."""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _prepare(x: torch.Tensor, pool: int, block: int = BLOCK) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
    if block % pool:
        raise ValueError(f"pool must divide {block}, got {pool}")
    if x.shape[-2] % block or x.shape[-1] % block:
        raise ValueError(f"image size {x.shape[-2]}×{x.shape[-1]} must be a multiple of {block}")
    x = x.float()
    return F.avg_pool2d(x, pool) if pool > 1 else x


def colour_spread_score(x: torch.Tensor, pool: int = 1, block: int = BLOCK) -> torch.Tensor:
    """Minus the colour variance inside each block×block superpatch (32×32 for /16 patches),
    summed over channels.

    pool > 1 first averages pool×pool pixels (4: 8×8 samples per 32-px block), which costs one
    pass over the image instead of several and ignores pixel noise finer than the pool.
    """
    with _fp32(x):
        x = _prepare(x, pool, block)
        k = block // pool
        xb = _blocks(x, k)
        # Shifted by the block's top-left sample: a uniform block is exactly 0, and the shift
        # keeps E[d²] − E[d]² free of the cancellation that raw moments suffer.
        d = (xb - xb[:, :, :, :1, :, :1]).reshape(x.shape)
        var = F.avg_pool2d(d * d, k) - F.avg_pool2d(d, k).square()  # avg_pool2d: faster than mean()
        return -var.clamp_min(0).sum(1).flatten(1)


def gradient_score(x: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """Minus the mean absolute horizontal and vertical finite difference inside each block.

    Only pixel pairs that lie inside one block count, so an edge on a block border lowers
    neither of its neighbours.
    """
    with _fp32(x):
        x = _prepare(x, pool)
        k = BLOCK // pool
        xb = _blocks(x, k)
        # one dim at a time, innermost first: several times faster than sum(dim=(1, 3, 5))
        dx = (xb[..., 1:] - xb[..., :-1]).abs().sum(5).sum(3).sum(1)
        dy = (xb[:, :, :, 1:] - xb[:, :, :, :-1]).abs().sum(5).sum(3).sum(1)
        pairs = 2 * x.shape[1] * k * (k - 1)
        return -((dx + dy) / pairs).flatten(1)


def embedding_score(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, metric: str = "variance"
) -> torch.Tensor:
    """Minus the dissimilarity of each block's four patch embeddings under the patch conv
    (`weight` (D, C, p, p) with p = 16, `bias` (D,)), e.g. a ViT's `patch_embed.proj`.

    metric "variance": the variance of the four embeddings around their mean, summed over D;
    "cosine": 1 − the mean pairwise cosine similarity. Both come from the six pairwise
    differences, so four identical embeddings give exactly 0 (the bias cancels in "variance").
    """
    if metric not in ("variance", "cosine"):
        raise ValueError(f"metric must be 'variance' or 'cosine', got {metric!r}")
    p = weight.shape[-1]
    if 2 * p != BLOCK:
        raise ValueError(f"patch conv must be {BLOCK // 2}×{BLOCK // 2}, got {tuple(weight.shape)}")
    with _fp32(x):
        x = _prepare(x, 1)
        b = None if bias is None else bias.float()
        e = F.conv2d(x, weight.float(), b, stride=p)  # (B, D, H/16, W/16)
        eb = _blocks(e, 2).permute(0, 2, 4, 3, 5, 1).flatten(3, 4)  # (B, h, w, 4, D)
        i, j = torch.triu_indices(4, 4, offset=1, device=x.device)
        if metric == "variance":
            # Σ_{i<j} |e_i − e_j|² = 4 Σ_i |e_i − ē|²
            dis = (eb[..., i, :] - eb[..., j, :]).square().sum((-1, -2)) / 16
        else:
            # 1 − cos(e_i, e_j) = |u_i − u_j|² / 2 for unit vectors u
            u = F.normalize(eb, dim=-1)
            dis = (u[..., i, :] - u[..., j, :]).square().sum((-1, -2)) / 12
        return -dis.flatten(1)


# Scores that need nothing but the image. colour_spread_pool4 is the recommended default: on the
# synthetic validation set its top-S purity matches full resolution (and the trained policy net),
# at a few per cent of the policy net's CPU time (BENCHMARKS.md, "The content policy").
def content_policy_scores(im: torch.Tensor, patch_size: int = 16) -> torch.Tensor:
    """The `content` policy's scores: colour spread on 8×8 averaged samples per superpatch
    (a superpatch is 2×2 patches)."""
    block = 2 * patch_size
    return colour_spread_score(im, pool=max(1, block // 8), block=block)


CONTENT_SCORES = {
    "colour_spread": colour_spread_score,
    "colour_spread_pool4": partial(colour_spread_score, pool=4),
    "gradient": gradient_score,
    "gradient_pool4": partial(gradient_score, pool=4),
}
DEFAULT_CONTENT_SCORE = "colour_spread_pool4"
