"""The segmentation loss and the finiteness check of the training loop."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from segm.data import IGNORE_LABEL
from segm.utils.distributed import all_reduce_sum

__all__ = ["NonFiniteLossError", "check_finite_parameters", "segmentation_loss"]


class NonFiniteLossError(RuntimeError):
    """The training loss (or the weights) became NaN or infinite."""


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, world_size: int = 1):
    """Cross-entropy (ignore 255) on full-resolution logits, averaged over the labelled pixels
    of the *global* batch.

    Returns (loss to backpropagate, global mean loss, detached). Under DDP, which averages the
    gradients of the ranks, each rank backpropagates `world_size · sum_rank / count_global`, so
    the update equals that of one process holding the whole batch even when the ranks hold
    different numbers of labelled pixels. (The reference averaged per-rank means instead; the
    two agree on a single process.) A batch without labelled pixels gives a zero loss.
    """
    loss_sum = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_LABEL, reduction="sum")
    count = (target != IGNORE_LABEL).sum()
    stats = torch.stack([loss_sum.detach(), count.to(loss_sum.dtype)])
    if world_size > 1:
        all_reduce_sum(stats)
    denom = stats[1].clamp(min=1)
    return loss_sum * (world_size / denom), stats[0] / denom


# Trained weights live within a few units; values this large mean an update destroyed them
# (an absurd learning rate), even while they are still finite.
EXPLODED_WEIGHT = 1e6


def check_finite_parameters(model: torch.nn.Module) -> None:
    """Raises NonFiniteLossError naming the first trainable parameter that holds NaN/inf or a
    value above EXPLODED_WEIGHT in magnitude (one device sync)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    peaks = torch.stack([p.detach().abs().amax().float() for _, p in named])
    bad = ~(peaks <= EXPLODED_WEIGHT)  # NaN compares false
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise NonFiniteLossError(
            f"the weights hold NaN, infinite or exploded values (first: {named[i][0]}, |w| up to {peaks[i]:.3g})"
        )
