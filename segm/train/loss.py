"""The training loss of both trainers (segmentation and the policy network) and the guards
that stop a run before broken weights can be checkpointed."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from segm.data import IGNORE_LABEL
from segm.utils.distributed import all_reduce_sum

__all__ = ["NonFiniteLossError", "check_finite_parameters", "check_loss", "exploded_loss", "segmentation_loss"]


class NonFiniteLossError(RuntimeError):
    """The training loss (or the weights) became NaN, infinite or exploded."""


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, world_size: int = 1):
    """Cross-entropy over the labelled cells of a label map (ignore 255): the segmenter's
    full-resolution logits, or the policy network's superpatch logits. Averaged over the
    labelled cells of the *global* batch.

    Returns (loss to backpropagate, global mean loss, detached). Under DDP, which averages the
    gradients of the ranks, each rank backpropagates `world_size · sum_rank / count_global`, so
    the update equals that of one process holding the whole batch even when the ranks hold
    different numbers of labelled pixels. (The reference averaged per-rank means instead; the
    two agree on a single process.) A batch without labelled cells gives a zero loss, not NaN.
    """
    loss_sum = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_LABEL, reduction="sum")
    count = (target != IGNORE_LABEL).sum()
    stats = torch.stack([loss_sum.detach(), count.to(loss_sum.dtype)])
    if world_size > 1:
        all_reduce_sum(stats)
    denom = stats[1].clamp(min=1)
    # One process: the quotient itself, bit for bit `CrossEntropyLoss(ignore_index=255)`.
    loss = loss_sum / denom if world_size == 1 else loss_sum * (world_size / denom)
    return loss, stats[0] / denom


def exploded_loss(n_cls: int) -> float:
    """A cross-entropy far above that of a uniform guess (ln K) means the weights are destroyed,
    even while they are finite: training stops before such a state can be checkpointed."""
    return 100 * math.log(max(n_cls, 2))


def check_loss(value: float, n_cls: int, where: str, then: str) -> None:
    """Raises NonFiniteLossError when a training loss (over K = `n_cls` classes) is NaN,
    infinite or exploded: "the loss is VALUE WHERE[ (exploded ...)]; THEN". `then` says what
    stopped and which checkpoint can be continued."""
    limit = exploded_loss(n_cls)
    if math.isfinite(value) and value <= limit:
        return
    what = "" if not math.isfinite(value) else f" (exploded: above 100·ln K = {limit:.0f}; lower the learning rate)"
    raise NonFiniteLossError(f"the loss is {value:.4g} {where}{what}; {then}")


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
