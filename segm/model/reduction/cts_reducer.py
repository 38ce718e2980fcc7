"""CTS behind the seam: a superpatch scorer picks the S superpatches to share, `embed` builds
the U + S mixed-scale tokens, and the decoder's class scores are unshared to the grid
(docs/DESIGN.md, "Data flow"). The geometry is `segm.model.reduction.cts`; the scorers are
`segm.model.reduction.scorers`."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from segm.model.reduction import cts
from segm.model.reduction.base import Reducer, TokenMap, grid_pos_embed, grid_to_tokens
from segm.model.reduction.rules import CTS, DEFAULT_POLICY_BACKBONE, Reduction, check_window
from segm.model.policy import load_policy_checkpoint
from segm.model.reduction.scorers import PolicyNetScorer, Scorer, build_scorer


class CtsRecord(NamedTuple):
    """What CTS decided for one batch."""

    layout: cts.TokenLayout
    scores: torch.Tensor | None  # (B, n2) the scorer's
    policy_logits: torch.Tensor | None  # (B, 2, Gh/2, Gw/2), policy_net only


class CtsReducer(Reducer):
    name = CTS
    unmerge_at = "scores"

    def __init__(self, grid: tuple[int, int], patch_size: int, scorer_name: str, scorer: Scorer, num_shared: int):
        super().__init__(grid, patch_size)
        self.scorer_name = scorer_name
        self.scorer = scorer
        self.num_shared = int(num_shared)  # validated with the model description (spec.check_net_kwargs)

    @classmethod
    def from_description(cls, reduction: Reduction, grid, patch_size: int, net: dict) -> CtsReducer:
        n2 = (grid[0] // 2) * (grid[1] // 2)
        scorer = build_scorer(reduction.scorer, n2, patch_size,
                              policy_backbone=net.get("policy_backbone") or DEFAULT_POLICY_BACKBONE,
                              random_seed=int(net.get("random_seed", 0)), oracle_dataset=net.get("oracle_dataset"))
        ckpt = net.get("policynet_ckpt")
        if isinstance(scorer, PolicyNetScorer) and ckpt and Path(ckpt).is_file():
            load_policy_checkpoint(scorer.policy_net, ckpt)
        return cls(grid, patch_size, reduction.scorer, scorer, reduction.num_shared)

    @property
    def needs_labels(self) -> bool:
        return self.scorer.needs_labels

    @property
    def crop(self) -> tuple[int, int]:
        return self.grid[0] * self.patch_size, self.grid[1] * self.patch_size

    def modules(self):
        return self.scorer.modules()

    def embed(self, vit, im, labels=None, given=None):
        if tuple(im.shape[-2:]) != self.crop:  # the token budget is fixed for the crop's grid
            check_window(CTS, self.crop, tuple(im.shape[-2:]))
        scores, logits = self.scorer(im, labels) if given is None else (given, None)
        grid = (im.shape[2] // self.patch_size, im.shape[3] // self.patch_size)
        layout = cts.layout_from_scores(scores, self.num_shared, grid)
        _, pos = grid_pos_embed(vit, grid)
        proj = vit.patch_embed.proj
        if layout.shared_idx.shape[1] > 0:
            # embed only the T selected patches: the patch conv as one matrix product
            pixels = cts.mixed_patches(im, layout, self.patch_size)
            x = vit.patch_embed.norm(F.linear(pixels, proj.weight.flatten(1), proj.bias))
            x = x + cts.mix_tokens(pos, cts.pool_grid(pos, grid), layout)
        else:
            x = vit.patch_embed.norm(grid_to_tokens(proj(im))) + pos
        return x, cts.layout_map(layout, CtsRecord(layout, scores, logits))

    def static_tokens(self, grid):
        return grid[0] * grid[1] - 3 * self.num_shared

    def settings(self) -> dict:
        n = self.grid[0] * self.grid[1]
        return {"policy": self.scorer_name, "num_shared": self.num_shared, "num_notshared": n - 4 * self.num_shared,
                **self.scorer.settings()}

    def policy_record(self) -> dict:
        s = self.settings()
        return {"method": s["policy"], "num_shared": s["num_shared"], "num_notshared": s["num_notshared"]}

    def generators(self) -> dict:
        return self.scorer.generators()

    def reset(self, seed: int | None = None) -> None:
        self.scorer.reset(seed)

    def label_dataset(self, name: str) -> None:
        self.scorer.label_dataset(name)

    def tag(self) -> str:
        return f"{self.scorer_name}_s{self.num_shared}"

    def summary(self) -> str:
        s = self.settings()
        return f"CTS, policy {self.scorer_name} (U, S) = ({s['num_notshared']}, {s['num_shared']})"

    def export_outputs(self, tmap: TokenMap) -> dict[str, torch.Tensor]:
        """The graph outputs beside the logits: the shared superpatches and their scores."""
        return {"shared_idx": tmap.record.layout.shared_idx, "scores": tmap.record.scores}

    def export_given(self, batch_size):
        """The random scorer's scores, fixed at export; the other scorers score in the graph."""
        return self.scorer.export_given(batch_size)

    def given_from_outputs(self, outputs):
        return outputs["scores"]
