"""Segmenter decoders. Both map (B, T, D) patch tokens to (B, T, K) class scores;
the grid shape never enters, so non-square crops and the reduced CTS token set just work."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class DecoderLinear(nn.Module):
    def __init__(self, n_cls: int, d_encoder: int):
        super().__init__()
        self.n_cls = n_cls
        self.head = nn.Linear(d_encoder, n_cls)
        self.apply(_init_weights)

    def no_weight_decay(self) -> set[str]:
        return set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class MaskTransformer(nn.Module):
    def __init__(
        self,
        n_cls: int,
        d_encoder: int,
        n_layers: int = 2,
        n_heads: int | None = None,
        d_model: int | None = None,
        d_ff: int | None = None,
        drop_path_rate: float = 0.0,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        d_model = d_model or d_encoder
        n_heads = n_heads or d_model // 64
        d_ff = d_ff or 4 * d_model
        self.n_cls = n_cls
        self.scale = d_model**-0.5
        norm = partial(nn.LayerNorm, eps=layer_norm_eps)
        dpr = torch.linspace(0, drop_path_rate, n_layers).tolist()
        self.blocks = nn.ModuleList(
            Block(
                d_model, n_heads, mlp_ratio=d_ff / d_model, qkv_bias=True,
                proj_drop=dropout, attn_drop=dropout, drop_path=dpr[i], norm_layer=norm,
            )
            for i in range(n_layers)
        )
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model))
        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.proj_patch = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.decoder_norm = norm(d_model)
        self.mask_norm = norm(n_cls)
        self.apply(_init_weights)
        trunc_normal_(self.cls_emb, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"cls_emb"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        x = self.proj_dec(x)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :t] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, t:] @ self.proj_classes, dim=-1)
        return self.mask_norm(patches @ classes.transpose(1, 2))


def create_decoder(name: str, n_cls: int, d_encoder: int, layer_norm_eps: float = 1e-5, **kwargs) -> nn.Module:
    if name == "linear":
        return DecoderLinear(n_cls, d_encoder)
    if name == "mask_transformer":
        return MaskTransformer(n_cls, d_encoder, layer_norm_eps=layer_norm_eps, **kwargs)
    raise ValueError(f"unknown decoder {name!r}: use 'linear' or 'mask_transformer'")
