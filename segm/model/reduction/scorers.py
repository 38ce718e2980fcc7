"""Superpatch scorers for CTS: one signature, `scorer(im, labels) → (scores (B, n2), policy
logits or None)`, higher = more shareable (docs/DESIGN.md, "Policies").

- `policy_net`: the frozen policy network, softmax(logits)[:, 1] (BatchNorm folded on the CPU);
- `content`: minus the colour variance of each block (no network);
- `random`: uniform scores from a seeded generator per device;
- `oracle`: from the ground-truth policy labels (one-class blocks first).
"""
from __future__ import annotations

import torch
from torch import nn

from segm.data.policy_labels import policy_labels, rules_for
from segm.model.policy import PolicyNet, fuse_batchnorm, policy_logits
from segm.model.reduction.content_policy import content_policy_scores


class Scorer:
    needs_labels = False

    def __init__(self, num_superpatches: int, patch_size: int):
        self.num_superpatches = num_superpatches
        self.patch_size = patch_size

    def modules(self) -> dict[str, nn.Module]:
        return {}

    def __call__(self, im: torch.Tensor, labels: torch.Tensor | None):
        raise NotImplementedError

    def settings(self) -> dict:
        """What the scorer's selections depend on beyond the image (recorded with the model)."""
        return {}

    def generators(self) -> dict:
        """The random generators (per device) it draws from; a fresh dict when it draws none."""
        return {}

    def reset(self, seed: int | None = None) -> None:
        """Restart its random draws (from `seed` when given)."""

    def label_dataset(self, name: str) -> None:
        """Told the dataset's name before scoring from that dataset's labels."""

    def export_given(self, batch_size: int | None) -> torch.Tensor | None:
        """Scores an exported graph holds as a constant (None: the graph computes them)."""
        return None


class PolicyNetScorer(Scorer):
    """The frozen policy network; it is the Segmenter's `policy_net` (checkpoint keys
    `policy_net.*`). Inference uses a BN-folded copy, rebuilt when the weights or device change."""

    def __init__(self, num_superpatches: int, patch_size: int, backbone: str):
        super().__init__(num_superpatches, patch_size)
        self.policy_net = PolicyNet(backbone)
        self.policy_net.to(memory_format=torch.channels_last)
        self.policy_net.requires_grad_(False)
        self.policy_net.eval()
        self._fused = None  # (key, BN-folded copy of policy_net); not part of the state

    def modules(self):
        return {"policy_net": self.policy_net}

    def inference_policy(self) -> nn.Module:
        if torch.compiler.is_compiling():
            return self.policy_net  # inductor folds BN itself
        tensors = list(self.policy_net.parameters()) + list(self.policy_net.buffers())
        first = tensors[0]
        key = (first.device, first.dtype, first.data_ptr(), sum(t._version for t in tensors))
        if self._fused is None or self._fused[0] != key:
            self._fused = (key, fuse_batchnorm(self.policy_net).to(memory_format=torch.channels_last))
        return self._fused[1]

    def __call__(self, im, labels):
        with torch.no_grad():
            logits = policy_logits(self.inference_policy(), im)
        return torch.softmax(logits.float(), dim=1)[:, 1].reshape(im.shape[0], -1), logits


class ContentScorer(Scorer):
    def __call__(self, im, labels):
        return content_policy_scores(im, self.patch_size), None


class RandomScorer(Scorer):
    """Uniform scores from a generator per device seeded with `seed`; the generators' states
    are saved with training checkpoints so a resumed run draws the same selections."""

    def __init__(self, num_superpatches: int, patch_size: int, seed: int = 0):
        super().__init__(num_superpatches, patch_size)
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def settings(self) -> dict:
        return {"random_seed": self.seed}

    def generators(self) -> dict:
        return self._generators

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.seed = seed
        self._generators.clear()

    def export_given(self, batch_size):
        """Drawn once at export, as the first CPU call after `reset()` draws them: the graph
        then needs a fixed batch."""
        if batch_size is None:
            raise ValueError("the random policy's scores are drawn once at export for a fixed batch")
        return self.first_draw(batch_size)

    def draw(self, batch: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
        return torch.rand(batch, self.num_superpatches, device=device, generator=generator)

    def first_draw(self, batch: int) -> torch.Tensor:
        """The scores the first CPU call after `reset()` draws (fixed into an exported graph)."""
        return self.draw(batch, torch.Generator().manual_seed(self.seed))

    def __call__(self, im, labels):
        return self.draw(im.shape[0], self.generator(im.device), im.device), None


class OracleScorer(Scorer):
    needs_labels = True

    def __init__(self, num_superpatches: int, patch_size: int, dataset: str | None = None):
        super().__init__(num_superpatches, patch_size)
        self.dataset = dataset

    def label_dataset(self, name: str) -> None:
        if self.dataset is None:  # the label rules of the data it scores, unless the run named them
            self.dataset = name

    def __call__(self, im, labels):
        if labels is None:
            raise ValueError("the oracle policy needs the ground-truth label map (seg_gt)")
        lab = policy_labels(labels, rules_for(self.dataset or "synthetic"))
        # single-class blocks first, then ignore-only/undecided, then mixed blocks
        score = torch.where(lab == 1, 1.0, torch.where(lab == 255, 0.5, 0.0))
        return score.reshape(im.shape[0], -1), None


def build_scorer(name: str, num_superpatches: int, patch_size: int, *, policy_backbone: str,
                 random_seed: int = 0, oracle_dataset: str | None = None) -> Scorer:
    if name == "policy_net":
        return PolicyNetScorer(num_superpatches, patch_size, policy_backbone)
    if name == "random":
        return RandomScorer(num_superpatches, patch_size, random_seed)
    if name == "oracle":
        return OracleScorer(num_superpatches, patch_size, oracle_dataset)
    if name == "content":
        return ContentScorer(num_superpatches, patch_size)
    raise ValueError(f"unknown superpatch scorer {name!r}")
