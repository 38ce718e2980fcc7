"""The timed variants, one token reducer each, all sharing one encoder and decoder built from a
preset or a checkpoint: the model without reduction, CTS with the policy network at the main
budget, optionally CTS with the random and content scorers and at the sweep's budgets, a
checkpoint's own reducer, every registered reducer named with `--reducer`, and every one named
with `--on-cts`, stacked on CTS's tokens (policy network, main budget)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from segm.bench.budgets import resolve_budgets
from segm.bench.settings import BASELINE, CTS_VARIANTS, BenchConfig, BenchError, parse_reducer
from segm.model.factory import create_segmenter, load_model
from segm.model.reduction import CTS, NONE, Reduction, ReductionError, build_reducer
from segm.model.reduction.base import Reducer
from segm.model.reduction.cts_reducer import CtsReducer
from segm.model.reduction.rules import NO_SHARING, registered_reduction
from segm.model.reduction.scorers import PolicyNetScorer
from segm.model.segmenter import Segmenter
from segm.model.spec import build_net_kwargs, check_net_kwargs

__all__ = ["BASELINE", "CTS_VARIANTS", "Variant", "build_variants", "policy_network", "restore_fused_attention",
           "set_fused_attention", "static_reduction"]


@dataclass
class Variant:
    name: str
    model: Segmenter
    series: str = ""  # the line of the sweep plot it belongs to
    sweep: bool = False  # an extra budget of the sweep
    reduction: float | None = None  # 1 − T/N; None until measured (a reducer whose T depends on the input)
    counts: dict = field(default_factory=dict)  # FLOPs and tokens, from count_flops
    backend: str = "eager"  # or "onnxruntime" (segm.bench.onnx)

    @property
    def reducer(self) -> Reducer:
        return self.model.reducer

    def describe(self) -> dict:
        return self.reducer.describe()

    @property
    def policy(self) -> str | None:
        """The reducer's `policy` setting (CTS: its scorer), the reference's `no_sharing` without
        reduction, else None."""
        return self.describe().get("policy", None if self.model.shares_tokens else NO_SHARING)

    @property
    def num_shared(self) -> int:
        """The reducer's `num_shared` setting (CTS: S), else 0."""
        return int(self.describe().get("num_shared") or 0)


def policy_network(model) -> PolicyNetScorer | None:
    """The policy-network scorer a model's reducer runs, if any (timed and counted on its own)."""
    scorer = getattr(model.reducer, "scorer", None)
    return scorer if isinstance(scorer, PolicyNetScorer) else None


def static_reduction(reducer: Reducer, grid: tuple[int, int]) -> float | None:
    """1 − T/N with T the reducer's token count at this grid, None when T depends on the input."""
    t = reducer.static_tokens(grid)
    return None if t is None else 1 - t / (grid[0] * grid[1])


def _base_model(cfg: BenchConfig) -> tuple[Segmenter, dict, tuple[int, list]]:
    """The model whose encoder and decoder all variants share, its net_kwargs and the budgets
    (`resolve_budgets`: a checkpoint's own S is the default). A preset's budgets are checked
    before its model is built."""
    if cfg.model_path is not None:
        model, variant = load_model(cfg.model_path)
        budgets = resolve_budgets(cfg, model.grid, model.describe_reduction().get("num_shared") or None)
        return model, variant["net_kwargs"], budgets
    ov = dict(cfg.overrides)
    decoder_layers = ov.pop("decoder_layers", None)
    net = build_net_kwargs(cfg.backbone, cfg.decoder, cfg.n_cls, cfg.crop_size, decoder_layers=decoder_layers, **ov)
    budgets = resolve_budgets(cfg, check_net_kwargs(net).grid)
    torch.manual_seed(cfg.seed)
    return create_segmenter(net, policy_ckpt_required=False), net, budgets


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


class _Reducers:
    """Builds the variants' reducers for one model: CTS reducers share one scorer per scorer name
    (one policy network: the checkpoint's when it has one), every other reducer comes from the
    registry (`build_reducer`)."""

    def __init__(self, cfg: BenchConfig, base: Segmenter, net: dict):
        self.grid, self.patch_size = base.grid, base.patch_size
        self.net = {**net, "random_seed": cfg.seed}
        self.seed = cfg.seed
        self.scorers = {}
        self.own_policy = policy_network(base)  # a checkpoint's trained policy network
        self.policy_source = "random weights (timing only: the cost does not depend on the weights)"
        if self.own_policy is not None:
            self.policy_source = f"checkpoint {cfg.model_path}"

    def build(self, reduction: Reduction) -> Reducer:
        return build_reducer(reduction, self.grid, self.patch_size, self.net)

    def cts(self, scorer: str, num_shared: int) -> CtsReducer:
        if scorer not in self.scorers:
            torch.manual_seed(self.seed)  # the policy network's random weights
            built = self.build(Reduction(CTS, scorer, num_shared)).scorer
            if isinstance(built, PolicyNetScorer) and self.own_policy is not None:
                built = self.own_policy
            self.scorers[scorer] = built
        return CtsReducer(self.grid, self.patch_size, scorer, self.scorers[scorer], num_shared)

    def registered(self, spec: str, under: Reduction | None = None) -> Reducer:
        """The reducer a `--reducer NAME[:KEY=VALUE,...]` names, its settings checked; `under`:
        the CTS reduction it stacks on (`--on-cts`)."""
        entry = parse_reducer(spec)
        try:
            torch.manual_seed(self.seed)  # a policy network underneath: the same random weights
            return self.build(registered_reduction(entry, self.grid, under=under))
        except ReductionError as e:
            raise BenchError(f"{'--on-cts' if under else '--reducer'} {spec!r}: {e}") from None


def build_variants(cfg: BenchConfig) -> tuple[list[Variant], dict]:
    """The model without reduction, CTS (policy net) at the main budget, the optional random and
    content scorers, the sweep points, a checkpoint's own reducer (other than CTS) and the
    `--reducer` ones, all sharing one encoder and decoder.

    Returns (variants, info) where info records the model and where the policy weights came from.
    """
    base, net, (s_main, sweep) = _base_model(cfg)
    grid = base.grid
    reducers = _Reducers(cfg, base, net)
    variants: list[Variant] = []

    def add(name: str, reducer: Reducer, series: str, sweep_point: bool = False) -> None:
        taken = {v.name for v in variants}
        unique, k = name, 2
        while unique in taken:
            unique, k = f"{name}_{k}", k + 1
        model = Segmenter(base.encoder, base.decoder, base.n_cls, reducer)
        variants.append(Variant(unique, model, series or unique, sweep_point, static_reduction(reducer, grid)))

    add(BASELINE, reducers.build(Reduction(NONE)), BASELINE)
    main_name, main_scorer, _, main_label = CTS_VARIANTS[0]
    for name, scorer, flag, label in CTS_VARIANTS:
        if flag is None or getattr(cfg, flag):
            add(name, reducers.cts(scorer, s_main), label)
    for s in sweep:
        reducer = reducers.cts(main_scorer, s)
        add(f"{main_name}_{static_reduction(reducer, grid):.2f}", reducer, main_label, sweep_point=True)
    if base.shares_tokens and base.reduction_method != CTS:  # a checkpoint's own reducer, as it was saved
        add(base.reducer.tag(), base.reducer, "")
    for spec in cfg.reducers:
        reducer = reducers.registered(spec)
        add(reducer.tag(), reducer, "")
    for spec in cfg.cts_reducers:
        reducer = reducers.registered(spec, under=Reduction(CTS, main_scorer, s_main))
        add(reducer.tag(), reducer, "")
    for v in variants:
        v.model.eval()
    return variants, _model_info(cfg, base, net, reducers.policy_source)


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
