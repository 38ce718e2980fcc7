"""Segmenter with Content-aware Token Sharing (docs/DESIGN.md, "Data flow").

forward: policy scores on the unpadded normalised input → top-S superpatches → mixed-scale
tokens (shared: the 2×2-average-pooled block through the same patch-embedding conv; position
embedding: mean of the four) → ViT → decoder on the T reduced tokens → unshare → bilinear ×P
upsample → unpad.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from segm.model import cts
from segm.model.policy import PolicyNet, fuse_batchnorm, policy_logits
from segm.model.content_policy import content_policy_scores
from segm.model.spec import DEFAULT_POLICY_BACKBONE, check_policy_method, check_window
from segm.model.vit import resize_pos_embed


class SegmenterOutput(NamedTuple):
    logits: torch.Tensor  # (B, K, H, W)
    policy_logits: torch.Tensor | None  # (B, 2, H/32, W/32) for policy_net
    layout: cts.TokenLayout

    @property
    def policy_indices(self):
        """(mask1, mask2) as the reference returns them."""
        return self.layout.masks()


class Segmenter(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        n_cls: int,
        policy_method: str = "no_sharing",
        num_shared: int = 0,
        policy_backbone: str = DEFAULT_POLICY_BACKBONE,
        random_seed: int = 0,
        oracle_dataset: str | None = None,
    ):
        super().__init__()
        check_policy_method(policy_method)
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
        self.policy_method = policy_method
        self.num_shared = int(num_shared)
        cts.resolve_token_budget(self.grid, policy_method, num_shared=self.num_shared)
        if policy_method == "policy_net":
            self.policy_net = PolicyNet(policy_backbone)
            self.policy_net.to(memory_format=torch.channels_last)
            self.policy_net.requires_grad_(False)
            self.policy_net.eval()
        self._fused_policy = None  # (key, BN-folded copy of policy_net); not part of the state
        self.random_seed = random_seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self.oracle_dataset = oracle_dataset

    # The policy network is frozen: it stays in eval mode whatever the segmenter does
    # (docs/DESIGN.md, "Deviations from the reference").
    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "policy_net"):
            self.policy_net.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        names = {"encoder.pos_embed", "encoder.cls_token", "encoder.dist_token"}
        return names | {f"decoder.{n}" for n in self.decoder.no_weight_decay()}

    @property
    def crop_size(self) -> tuple[int, int]:
        return self.grid[0] * self.patch_size, self.grid[1] * self.patch_size

    @property
    def num_superpatches(self) -> int:
        """Superpatches (2×2 patch groups) of the crop: the length of a policy's scores."""
        return (self.grid[0] // 2) * (self.grid[1] // 2)

    @property
    def shares_tokens(self) -> bool:
        return self.policy_method != "no_sharing"

    @property
    def needs_labels(self) -> bool:
        """The oracle policy selects from the ground truth: forward needs `seg_gt`."""
        return self.policy_method == "oracle"

    # ---------------------------------------------------------------- policy
    def inference_policy(self) -> nn.Module:
        """The frozen policy with BatchNorm folded in, rebuilt when its weights or device change."""
        if torch.compiler.is_compiling():
            return self.policy_net  # inductor folds BN itself
        tensors = list(self.policy_net.parameters()) + list(self.policy_net.buffers())
        first = tensors[0]
        key = (first.device, first.dtype, first.data_ptr(), sum(t._version for t in tensors))
        if self._fused_policy is None or self._fused_policy[0] != key:
            fused = fuse_batchnorm(self.policy_net).to(memory_format=torch.channels_last)
            self._fused_policy = (key, fused)
        return self._fused_policy[1]

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.random_seed)
        return self._generators[device]

    def reset_random_policy(self, seed: int | None = None) -> None:
        if seed is not None:
            self.random_seed = seed
        self._generators.clear()

    def random_scores(self, batch: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
        """The random policy's scores (B, n2): uniform, drawn from `generator` (on `device`).
        The export draws them once with a fresh generator, as the eager model's first call."""
        return torch.rand(batch, self.num_superpatches, device=device, generator=generator)

    def policy_scores(self, im: torch.Tensor, seg_gt: torch.Tensor | None):
        """(scores (B, n2) or None, policy logits or None)."""
        b = im.shape[0]
        if self.policy_method == "policy_net":
            with torch.no_grad():
                logits = policy_logits(self.inference_policy(), im)
            return torch.softmax(logits.float(), dim=1)[:, 1].reshape(b, -1), logits
        if self.policy_method == "random":
            return self.random_scores(b, self._generator(im.device), im.device), None
        if self.policy_method == "content":
            return content_policy_scores(im, self.patch_size), None
        if self.policy_method == "oracle":
            if seg_gt is None:
                raise ValueError("the oracle policy needs the ground-truth label map (seg_gt)")
            from segm.data.policy_labels import policy_labels, rules_for

            lab = policy_labels(seg_gt, rules_for(self.oracle_dataset or "synthetic"))
            # single-class blocks first, then ignore-only/undecided, then mixed blocks
            score = torch.where(lab == 1, 1.0, torch.where(lab == 255, 0.5, 0.0))
            return score.reshape(b, -1), None
        return None, None

    # ---------------------------------------------------------------- encoder
    def encode(self, im: torch.Tensor, layout: cts.TokenLayout) -> torch.Tensor:
        """ViT on the mixed-scale token set. Returns (B, T, D) patch features (prefix dropped)."""
        vit = self.encoder
        grid = layout.grid
        npt = vit.num_prefix_tokens
        pos = vit.pos_embed
        if pos.shape[1] - npt != grid[0] * grid[1]:  # no_sharing at another size: resized on the fly, as plain Segmenter does
            pos = resize_pos_embed(pos, grid, npt)
        pos_prefix, pos_grid = pos[:, :npt], pos[:, npt:]

        proj = vit.patch_embed.proj
        if layout.shared_idx.shape[1] > 0:
            # embed only the T selected patches: the patch conv as one matrix product
            pixels = cts.mixed_patches(im, layout, self.patch_size)
            x = vit.patch_embed.norm(F.linear(pixels, proj.weight.flatten(1), proj.bias))
            x = x + cts.mix_tokens(pos_grid, cts.pool_grid(pos_grid, grid), layout)
        else:
            x = vit.patch_embed.norm(cts.grid_to_tokens(proj(im))) + pos_grid

        prefix = [vit.cls_token]
        if getattr(vit, "dist_token", None) is not None:
            prefix.append(vit.dist_token)
        prefix = torch.cat(prefix, dim=1) + pos_prefix
        x = torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)
        x = vit.pos_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        x = vit.norm(x)
        return x[:, npt:]

    # ---------------------------------------------------------------- forward
    def forward_all(self, im: torch.Tensor, seg_gt: torch.Tensor | None = None) -> SegmenterOutput:
        check_window(self.policy_method, self.crop_size, tuple(im.shape[-2:]))
        scores, policy_logits = self.policy_scores(im, seg_gt)
        return self.forward_with_scores(im, scores, policy_logits)

    def forward_with_scores(self, im: torch.Tensor, scores: torch.Tensor | None,
                            policy_logits: torch.Tensor | None = None) -> SegmenterOutput:
        """The forward pass from given superpatch scores (B, n2) (None: no sharing), e.g. the
        random policy's scores drawn once when exporting (segm.export)."""
        b, _, h, w = im.shape
        p = self.patch_size
        pad_h, pad_w = (-h) % p, (-w) % p
        if pad_h or pad_w:
            im = F.pad(im, (0, pad_w, 0, pad_h))
        grid = (im.shape[2] // p, im.shape[3] // p)
        if scores is None:
            layout = cts.no_sharing_layout(b, grid, im.device)
        else:
            layout = cts.layout_from_scores(scores, self.num_shared, grid)

        feats = self.encode(im, layout)
        token_scores = self.decoder(feats)  # (B, T, K)
        masks = cts.unshare(token_scores, layout)  # (B, K, Gh, Gw), channels-last view
        logits = F.interpolate(masks, size=im.shape[2:], mode="bilinear", align_corners=False)
        return SegmenterOutput(logits[:, :, :h, :w], policy_logits, layout)

    def forward(self, im: torch.Tensor, seg_gt: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_all(im, seg_gt).logits
