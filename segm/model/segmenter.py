"""Segmenter with a pluggable token reduction (docs/DESIGN.md, "Data flow", "Token reduction").

forward: pad to a multiple of P → the reducer embeds the patches (CTS: policy scores → top-S
superpatches → mixed-scale tokens) → ViT blocks, with the reducer's attention bias and its
step after each block → final norm → unmerge the tokens to the grid (before the decoder, or
its class scores after it) → bilinear ×P upsample → unpad.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from segm.model.labels import labels_from_scores
from segm.model.reduction.base import Reducer, TokenMap, attention_residual, cells_to_grid, mlp_residual, unmerge


class SegmenterOutput(NamedTuple):
    logits: torch.Tensor  # (B, K, H, W)
    policy_logits: torch.Tensor | None  # (B, 2, H/32, W/32) for CTS's policy_net
    token_map: TokenMap

    @property
    def layout(self):
        """CTS's token layout: the record's, the no-sharing layout when no token is merged,
        None for other reducers."""
        layout = getattr(self.token_map.record, "layout", None)
        if layout is None and self.token_map.identity:
            from segm.model.reduction.cts import no_sharing_layout

            tmap = self.token_map
            return no_sharing_layout(tmap.token_of_cell.shape[0], tmap.grid, tmap.token_of_cell.device)
        return layout

    @property
    def policy_indices(self):
        """(mask1, mask2) as the reference returns them (CTS)."""
        return self.layout.masks()


class Segmenter(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, n_cls: int, reducer: Reducer | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.n_cls = n_cls
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.grid = tuple(encoder.patch_embed.grid_size)
        proj = encoder.patch_embed.proj  # CTS embeds selected patches with its weight as a matrix
        if not (
            isinstance(proj, nn.Conv2d)
            and proj.kernel_size == proj.stride == (self.patch_size, self.patch_size)
            and proj.padding == (0, 0)
        ):
            raise ValueError(
                f"the encoder's patch embedding must be a {self.patch_size}×{self.patch_size} conv "
                f"with stride {self.patch_size} and no padding"
            )
        self.reducer = reducer or Reducer(self.grid, self.patch_size)
        for name, module in self.reducer.modules().items():  # e.g. policy_net: its keys stay `policy_net.*`
            module.requires_grad_(False)
            self.add_module(name, module)

    # The reducer's modules (the policy network) are frozen: they stay in eval mode whatever the
    # segmenter does (docs/DESIGN.md, "Deviations from the reference").
    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.reducer.modules().values():
            module.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        names = {"encoder.pos_embed", "encoder.cls_token", "encoder.dist_token"}
        return names | {f"decoder.{n}" for n in self.decoder.no_weight_decay()}

    @property
    def crop_size(self) -> tuple[int, int]:
        return self.grid[0] * self.patch_size, self.grid[1] * self.patch_size

    @property
    def shares_tokens(self) -> bool:
        """Whether the model reduces tokens (any reducer but `none`)."""
        return self.reducer.name != "none"

    @property
    def needs_labels(self) -> bool:
        """The reducer reads the ground truth (CTS's oracle): forward needs `seg_gt`."""
        return self.reducer.needs_labels

    @property
    def reduction_method(self) -> str:
        """The reducer's registered name (`none`, `cts`, ...)."""
        return self.reducer.name

    def describe_reduction(self) -> dict:
        """What outputs record of the reduction (`Reducer.describe`)."""
        return self.reducer.describe()

    # ---------------------------------------------------------------- encoder
    def encode(self, im: torch.Tensor, seg_gt: torch.Tensor | None = None,
               given: torch.Tensor | None = None) -> tuple[torch.Tensor, TokenMap]:
        """ViT on the reducer's tokens: (B, T, D) patch features (prefix dropped) and their map."""
        vit = self.encoder
        x, tmap = self.reducer.embed(vit, im, seg_gt, given)
        npt = vit.num_prefix_tokens
        prefix = [vit.cls_token]
        if getattr(vit, "dist_token", None) is not None:
            prefix.append(vit.dist_token)
        prefix = torch.cat(prefix, dim=1) + vit.pos_embed[:, :npt]
        x = torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)
        x = vit.pos_drop(x)
        x = vit.norm_pre(x)
        reducer = self.reducer
        between = reducer.acts_after_blocks()
        for i, block in enumerate(vit.blocks):
            bias = reducer.attn_bias(tmap)
            if reducer.merges_inside(i):  # the block in its two halves, the reducer between them
                x, tmap = reducer.after_attention(i, attention_residual(block, x, bias), tmap)
                x = mlp_residual(block, x)
            else:
                x = block(x) if bias is None else block(x, attn_mask=bias)
            if between:
                x, tmap = reducer.after_block(i, x, tmap)
        x = vit.norm(x)
        return x[:, npt:], tmap

    # ---------------------------------------------------------------- forward
    def forward_scores(self, im: torch.Tensor, seg_gt: torch.Tensor | None = None,
                       given: torch.Tensor | None = None) -> tuple[torch.Tensor, TokenMap]:
        """Class scores on the patch grid of the image padded to a multiple of P: (B, K, Gh, Gw),
        a channels-last view, and the token map. Logits and labels are both made from these."""
        h, w = im.shape[2:]
        p = self.patch_size
        pad_h, pad_w = (-h) % p, (-w) % p
        if pad_h or pad_w:
            im = F.pad(im, (0, pad_w, 0, pad_h))
        feats, tmap = self.encode(im, seg_gt, given)
        if self.reducer.unmerge_at == "features":
            feats = unmerge(feats, tmap)
            scores = self.decoder(feats)  # (B, N, K)
        else:
            scores = unmerge(self.decoder(feats), tmap)  # (B, T, K) → (B, N, K)
        return cells_to_grid(scores, tmap.grid), tmap

    def forward_all(self, im: torch.Tensor, seg_gt: torch.Tensor | None = None,
                    given: torch.Tensor | None = None) -> SegmenterOutput:
        """The forward pass with what the reducer decided. `given`: the reducer's precomputed
        selection input (CTS: superpatch scores (B, n2)), e.g. fixed when exporting."""
        h, w = im.shape[2:]
        masks, tmap = self.forward_scores(im, seg_gt, given)
        size = (masks.shape[2] * self.patch_size, masks.shape[3] * self.patch_size)
        logits = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        return SegmenterOutput(logits[:, :, :h, :w], getattr(tmap.record, "policy_logits", None), tmap)

    def forward_labels(self, im: torch.Tensor, seg_gt: torch.Tensor | None = None,
                       given: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W) int64: `forward_all(im).logits.argmax(1)`, bit for bit, without the
        (B, K, H, W) logits (`segm.model.labels.labels_from_scores`: upsampled in bands of rows)."""
        masks, _ = self.forward_scores(im, seg_gt, given)
        return labels_from_scores(masks, self.patch_size, tuple(im.shape[2:]))

    def forward(self, im: torch.Tensor, seg_gt: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_all(im, seg_gt).logits
