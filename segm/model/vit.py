"""The ViT encoder: a timm VisionTransformer built for the training crop.

Key names follow timm, so timm ViT weights and reference checkpoints map 1:1. Attention is
timm's fused path (`F.scaled_dot_product_attention`).
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from segm.config import pair as _pair
from segm.utils.checkpoint import safe_torch_load, state_dict_mismatch


def create_vit(
    image_size,
    patch_size: int,
    d_model: int,
    n_heads: int,
    n_layers: int,
    d_ff: int | None = None,
    distilled: bool = False,
    dropout: float = 0.0,
    drop_path_rate: float = 0.0,
    layer_norm_eps: float = 1e-5,
) -> VisionTransformer:
    h, w = _pair(image_size)
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}×{w} is not a multiple of the patch size {patch_size}")
    mlp_ratio = (d_ff or 4 * d_model) / d_model
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    vit = cls(
        img_size=(h, w),
        patch_size=patch_size,
        embed_dim=d_model,
        depth=n_layers,
        num_heads=n_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        num_classes=1000,  # the reference keeps an unused ImageNet head (a frozen state-dict key)
        drop_rate=dropout,
        pos_drop_rate=dropout,
        proj_drop_rate=dropout,
        attn_drop_rate=dropout,
        drop_path_rate=drop_path_rate,  # timm: linspace(0, rate, depth)
        norm_layer=partial(nn.LayerNorm, eps=layer_norm_eps),
    )
    return vit


def resize_pos_embed(pos_embed: torch.Tensor, new_grid, num_extra: int) -> torch.Tensor:
    """Bilinear (align_corners=False, no antialiasing: the reference's) resize of the grid part
    of a (1, extra + h·w, D) embedding (e.g. 24→32 at crop 512) with timm's
    `resample_abs_pos_embed`. The source grid is square unless its size already matches."""
    gh, gw = _pair(new_grid)
    n_old = pos_embed.shape[1] - num_extra
    if n_old == gh * gw:  # timm would assume a square source here
        return pos_embed
    old = math.isqrt(n_old)
    if old * old != n_old:
        raise ValueError(f"cannot resize a non-square position embedding of {n_old} cells")
    return resample_abs_pos_embed(pos_embed, [gh, gw], [old, old], num_prefix_tokens=num_extra,
                                  interpolation="bilinear", antialias=False)


def _load_npz(vit: VisionTransformer, path: Path) -> dict:
    """AugReg `.npz` → a timm state dict, through timm's own npz loader on a model built at
    the file's grid (so no bicubic resample happens inside timm)."""
    from timm.models.vision_transformer import _load_weights

    with np.load(path) as w:
        key = "Transformer/posembed_input/pos_embedding"
        if key not in w:
            raise ValueError(f"{path} is not an AugReg ViT .npz file (no {key})")
        n = w[key].shape[1] - vit.num_prefix_tokens
    side = int(math.sqrt(n))
    p = vit.patch_embed.patch_size[0]
    src = create_vit(
        side * p, p, vit.embed_dim, vit.blocks[0].attn.num_heads, len(vit.blocks),
        d_ff=vit.blocks[0].mlp.fc1.out_features,
    )
    _load_weights(src, str(path))
    return src.state_dict()


def _read_weight_file(vit: VisionTransformer, path: Path) -> dict:
    """An AugReg `.npz` or a `.safetensors` file as a state dict; an unreadable file is named."""
    try:
        if path.suffix == ".npz":
            return _load_npz(vit, path)
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as e:  # numpy, zipfile and safetensors each raise their own types
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"cannot read pretrained weights {path}: {type(e).__name__}: {first}") from None


def load_pretrained_vit(vit: VisionTransformer, source: str) -> None:
    """Loads encoder weights from a local `.npz` (AugReg), `.pth`/`.pt` or `.safetensors` file,
    or, when online, a timm hub name. The position embedding is resized bilinearly to the
    encoder's grid; the ImageNet head is loaded when it fits, else left as initialised."""
    path = Path(source)
    if path.suffix in (".npz", ".pth", ".pt", ".bin", ".safetensors"):
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights not found: {path}")
        if path.suffix in (".npz", ".safetensors"):
            state = _read_weight_file(vit, path)
        else:
            state = safe_torch_load(path)
            for k in ("model", "state_dict"):
                if isinstance(state, dict) and k in state and isinstance(state[k], dict):
                    state = state[k]
    else:
        import timm

        try:
            state = timm.create_model(source, pretrained=True).state_dict()
        except Exception as e:  # offline, unknown name, ...
            raise ValueError(
                f"cannot load pretrained weights {source!r}: not a local .npz/.pth/.safetensors file, "
                f"and timm could not fetch it ({type(e).__name__}: {e}). Pass --pretrained FILE"
            ) from None
    state = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in state.items()}
    if "pos_embed" in state:
        state["pos_embed"] = resize_pos_embed(
            state["pos_embed"], vit.patch_embed.grid_size, vit.num_prefix_tokens
        )
    own = vit.state_dict()
    for head in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
        if head in state and state[head].shape != own[head].shape:
            del state[head]
    problem = state_dict_mismatch(vit, state, ignore_missing=("head.", "head_dist."))
    if problem:
        raise ValueError(f"pretrained weights {source} do not fit the encoder: {problem}")
    vit.load_state_dict(state, strict=False)
