"""Policy-net targets from ground truth (docs/DESIGN.md, "Policies"), vectorised over the batch.

A 32×32 block (one superpatch, 2·patch_size) is labelled 1 ("shareable") when it holds a
single value, 0 when it holds two or more real classes, and 255 (ignored by the loss)
according to per-dataset rules for blocks made of ignore pixels.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .base import IGNORE_LABEL, canonical_name

if TYPE_CHECKING:
    import torch

BLOCK = 32


@dataclasses.dataclass(frozen=True)
class PolicyLabelRules:
    """Reference `policy_gt_gen` options.

    zero_is_ignore: label 0 counts as ignore before pooling (Pascal-Context background).
    group_if_all_ignore: an all-ignore block is labelled 1 (else 255).
    ignore_if_one_class_plus_ignore: one class + ignore -> 255 (else 0).
    ignore_if_one_class_plus_ignore_border: as above, on the outer ring of blocks only.
    """

    zero_is_ignore: bool = False
    group_if_all_ignore: bool = True
    ignore_if_one_class_plus_ignore: bool = False
    ignore_if_one_class_plus_ignore_border: bool = False


_RULES = {
    "ade20k": PolicyLabelRules(ignore_if_one_class_plus_ignore_border=True),
    "pascal_context": PolicyLabelRules(zero_is_ignore=True),
    "cityscapes": PolicyLabelRules(),
    "synthetic": PolicyLabelRules(),
    "custom": PolicyLabelRules(),
}


def rules_for(dataset_name: str) -> PolicyLabelRules:
    return _RULES[canonical_name(dataset_name)]


def policy_labels(label: torch.Tensor, rules: PolicyLabelRules, block: int = BLOCK) -> torch.Tensor:
    """label: long (B, H, W) or (H, W), train label space (ignore 255), H and W multiples of
    `block` -> long (B, H/block, W/block) (or (H/block, W/block)) in {0, 1, 255}, same device.

    ADE20K's reference pre-map `gt==0 -> 255` is what reduce_zero_label already did; the
    following −1 shift of the real labels changes no comparison below.
    """
    import torch  # here: `segm.data` (the preparation scripts' dataset names) loads without torch

    if label.dim() not in (2, 3):
        raise ValueError(f"label must be (B, H, W) or (H, W), got shape {tuple(label.shape)}")
    if label.dtype.is_floating_point or label.dtype == torch.bool:
        raise TypeError(f"label must be an integer tensor, got {label.dtype}")
    squeeze = label.dim() == 2
    lab = label.unsqueeze(0) if squeeze else label
    b, h, w = lab.shape
    if h % block or w % block:
        raise ValueError(
            f"label size {h}x{w} must be a multiple of {block} in both dimensions "
            "(pad or crop the label to the training crop first)"
        )
    lab = lab.long()
    if rules.zero_is_ignore:
        lab = lab.masked_fill(lab == 0, IGNORE_LABEL)
    blocks = lab.reshape(b, h // block, block, w // block, block)
    mx = blocks.amax(dim=(2, 4))
    mn = blocks.amin(dim=(2, 4))  # ignore (255) is larger than every real label
    one_class = mx == mn  # 255 counts as a value: all-ignore blocks are "one class"
    mx_real = blocks.masked_fill(blocks == IGNORE_LABEL, -1000).amax(dim=(2, 4))
    one_plus_ignore = (mx_real == mn) & ~one_class

    out = one_class.long()
    if not rules.group_if_all_ignore:
        out = out.masked_fill(one_class & (mx == IGNORE_LABEL), IGNORE_LABEL)
    if rules.ignore_if_one_class_plus_ignore:
        out = out.masked_fill(one_plus_ignore, IGNORE_LABEL)
    if rules.ignore_if_one_class_plus_ignore_border:
        gh, gw = out.shape[-2:]
        ring = torch.ones(gh, gw, dtype=torch.bool, device=out.device)
        ring[1:-1, 1:-1] = False
        out = out.masked_fill(one_plus_ignore & ring, IGNORE_LABEL)
    return out[0] if squeeze else out
