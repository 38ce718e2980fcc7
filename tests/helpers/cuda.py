"""Helpers of the CUDA tests (tests/test_cuda.py): learnable synthetic batches, tiny CTS models,
the precision settings and the top-S comparison that tolerates float-rounding near-ties."""
from __future__ import annotations

import contextlib

import torch

from segm.model.spec import build_net_kwargs

K = 10  # classes
PALETTE_SEED = 1234  # one fixed class → colour map, so the task is learnable across batches


def blocks(batch: int, size: int, seed: int, n_cls: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (B, 3, size, size) in the normalised range, labels (B, size, size)): a random class
    per 16×16 patch, each class a fixed colour plus noise. Superpatches then hold one to four
    classes, so the policy's scores spread out."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, n_cls, (batch, size // 16, size // 16), generator=g)
    lab = lab.repeat_interleave(16, 1).repeat_interleave(16, 2)
    palette = torch.rand(n_cls, 3, generator=torch.Generator().manual_seed(PALETTE_SEED)) * 2 - 1
    im = palette[lab].permute(0, 3, 1, 2) + 0.2 * torch.randn(batch, 3, size, size, generator=g)
    return im.contiguous(), lab


def tiny_net_kwargs(policy_ckpt=None, *, policy_method="policy_net", decoder="linear", crop=128,
                    num_shared=4) -> dict:
    """ViT-Tiny (2 layers) + a 1-layer decoder, no dropout or drop path; S = 4 of 16 at 128 px."""
    sharing = policy_method != "no_sharing"
    return build_net_kwargs(
        "vit_tiny_patch16_384", decoder, K, crop, drop_path_rate=0.0, n_layers=2,
        decoder_layers=1 if decoder == "mask_transformer" else None, policy_method=policy_method,
        num_shared=num_shared if sharing else None,
        policynet_ckpt=str(policy_ckpt) if policy_method == "policy_net" else None,
    )


@contextlib.contextmanager
def strict_fp32():
    """fp32 matmuls and convolutions without TF32 (cuDNN allows TF32 by default, and
    `segm.train` turns it on for matmuls too) and without cuDNN's benchmark mode (which may pick
    a less exact algorithm): CPU/CUDA comparisons need all three off."""
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    before = flags[0].allow_tf32, flags[1].allow_tf32, flags[1].benchmark
    flags[0].allow_tf32 = flags[1].allow_tf32 = flags[1].benchmark = False
    try:
        yield
    finally:
        flags[0].allow_tf32, flags[1].allow_tf32, flags[1].benchmark = before


def boundary_gaps(scores: torch.Tensor, num_shared: int) -> torch.Tensor:
    """Per image, the score gap between the S-th and (S+1)-th best superpatch."""
    top = scores.sort(dim=1, descending=True).values
    return top[:, num_shared - 1] - top[:, num_shared]


def assert_same_top_s(ref_scores: torch.Tensor, sel_ref: torch.Tensor, sel_other: torch.Tensor,
                      num_shared: int, tol: float) -> None:
    """The two selections are equal, except for superpatches whose reference score lies within
    `tol` of the selection boundary (a float-rounding near-tie may go either way)."""
    top = ref_scores.sort(dim=1, descending=True).values
    for b in range(ref_scores.shape[0]):
        threshold = (top[b, num_shared - 1] + top[b, num_shared]) / 2
        differ = set(sel_ref[b].tolist()) ^ set(sel_other[b].tolist())
        far = [(i, float(ref_scores[b, i])) for i in differ if abs(ref_scores[b, i] - threshold) > tol]
        assert not far, (
            f"image {b}: selections differ at superpatches far from the boundary {float(threshold):.6f}: {far}"
        )


def logits_error(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Mean and max absolute difference, relative to the reference's mean and max magnitude."""
    d = (out.float() - ref.float()).abs()
    return {"mean_rel": float(d.mean() / ref.abs().mean()), "max_rel": float(d.max() / ref.abs().max())}
