"""The timed variants: no_sharing, CTS (policy net) at the main budget, optionally the random
and content policies and sweep points, all sharing one encoder and decoder built from a preset or a checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from segm.bench.budgets import resolve_budgets
from segm.bench.settings import BenchConfig
from segm.model.factory import create_segmenter, load_model
from segm.model.segmenter import Segmenter
from segm.model.spec import build_net_kwargs, check_net_kwargs


@dataclass
class Variant:
    name: str
    policy: str
    num_shared: int
    model: Segmenter
    reduction: float = 0.0
    counts: dict = field(default_factory=dict)  # FLOPs and tokens, from count_flops
    backend: str = "eager"  # or "onnxruntime" (segm.bench.onnx)


def _base_model(cfg: BenchConfig) -> tuple[Segmenter, dict, tuple[int, list]]:
    """The model whose encoder and decoder all variants share, its net_kwargs and the budgets
    (`resolve_budgets`). A preset's budgets are checked before its model is built."""
    if cfg.model_path is not None:
        model, variant = load_model(cfg.model_path)
        budgets = resolve_budgets(cfg, model.grid, model.num_shared if model.policy_method == "policy_net" else None)
        return model, variant["net_kwargs"], budgets
    ov = dict(cfg.overrides)
    decoder_layers = ov.pop("decoder_layers", None)
    net = build_net_kwargs(
        cfg.backbone, cfg.decoder, cfg.n_cls, cfg.crop_size, decoder_layers=decoder_layers,
        policy_method="no_sharing", **ov,
    )
    budgets = resolve_budgets(cfg, check_net_kwargs(net).grid)
    torch.manual_seed(cfg.seed)
    return create_segmenter(net, policy_ckpt_required=False), net, budgets


def _policy_net(cfg: BenchConfig, base: Segmenter, s_main: int) -> tuple[torch.nn.Module, str]:
    """The one policy network all CTS variants share, and where its weights came from."""
    if base.policy_method == "policy_net":
        return base.policy_net, f"checkpoint {cfg.model_path}"
    torch.manual_seed(cfg.seed)
    policy_net = Segmenter(base.encoder, base.decoder, base.n_cls, "policy_net", s_main).policy_net
    return policy_net, "random weights (timing only: the cost does not depend on the weights)"


def _model_info(cfg: BenchConfig, base: Segmenter, net: dict, policy_source: str) -> dict:
    grid = base.grid
    decoder = net["decoder"]["name"] if isinstance(net["decoder"], dict) else net["decoder"]
    return {
        "backbone": net.get("backbone"), "decoder": decoder, "n_cls": base.n_cls,
        "crop_size": list(base.crop_size), "patch_size": base.patch_size, "grid": list(grid),
        "num_patches": grid[0] * grid[1], "d_model": net.get("d_model"), "n_layers": net.get("n_layers"),
        "n_heads": net.get("n_heads"), "normalization": net.get("normalization", "vit"),
        "policy_weights": policy_source, "model_path": cfg.model_path,
    }


def build_variants(cfg: BenchConfig) -> tuple[list[Variant], dict]:
    """no_sharing, CTS (policy net) at the main budget, optional random policy and sweep points,
    all sharing one encoder and decoder.

    Returns (variants, info) where info records the model and where the policy weights came from.
    """
    base, net, (s_main, sweep) = _base_model(cfg)
    n = base.grid[0] * base.grid[1]
    policy_net, policy_source = _policy_net(cfg, base, s_main)

    def make(policy: str, s: int) -> Segmenter:
        m = Segmenter(base.encoder, base.decoder, base.n_cls, policy_method=policy, num_shared=s,
                      random_seed=cfg.seed)
        if policy == "policy_net":
            m.policy_net = policy_net
        return m

    variants = [Variant("no_sharing", "no_sharing", 0, make("no_sharing", 0))]
    variants.append(Variant("cts", "policy_net", s_main, make("policy_net", s_main)))
    if cfg.with_random:
        variants.append(Variant("random", "random", s_main, make("random", s_main)))
    if cfg.with_content:
        variants.append(Variant("content", "content", s_main, make("content", s_main)))
    for s in sweep:
        variants.append(Variant(f"cts_{3 * s / n:.2f}", "policy_net", s, make("policy_net", s)))
    for v in variants:
        v.reduction = 3 * v.num_shared / n
        v.model.eval()
    return variants, _model_info(cfg, base, net, policy_source)


def set_fused_attention(model: torch.nn.Module, enabled: bool) -> list:
    """Switches timm's fused attention (F.scaled_dot_product_attention) on every Attention
    module; returns the previous values for `restore_fused_attention`."""
    mods = [m for m in model.modules() if hasattr(m, "fused_attn")]
    old = [m.fused_attn for m in mods]
    for m in mods:
        m.fused_attn = enabled
    return list(zip(mods, old))


def restore_fused_attention(saved: list) -> None:
    """Undoes `set_fused_attention`."""
    for m, v in saved:
        m.fused_attn = v
