"""The one path from options to a model: every rule about what a Segmenter may be.

`build_net_kwargs` turns command-line choices into the model description that `variant.yml`
records; `check_net_kwargs` validates such a description (ours, or a reference run's) and is
what `create_segmenter` builds from. Nothing else validates the token budget, the crop, the
policy method or the policy backbone, and nothing else reads the `config.json` that
`policynet.train` writes beside a policy checkpoint. See docs/DESIGN.md, "Model description".

This module imports no model code (no timm), so command-line tools can validate cheaply.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from segm.config import load_config, pair
from segm.model.reduction.policy_rules import (  # noqa: F401 (re-exported: the model's rules, one import)
    DEFAULT_TOKEN_REDUCTION, POLICY_PATCH_SIZE, POLICY_RECORD, REFERENCE_NUM_SHARED, check_policy_backbone,
    check_policy_checkpoint, check_policy_options, read_policy_record, recorded_policy_backbone,
    reference_num_shared, resolve_policy_backbone, uses_policy_net,
)
from segm.model.reduction.rules import (  # noqa: F401 (re-exported: the model's rules, one import)
    CTS, DEFAULT_POLICY_BACKBONE, NO_SHARING, NONE, POLICY_METHODS, ModelConfigError, Reduction, ReductionError,
    TokenBudgetError, check_crop, check_policy_method, check_window, policy_reduction, reducer_entry,
    reducer_record, registered_reduction, resolve_token_budget,
)


@dataclass(frozen=True)
class ModelSpec:
    """A validated model description: what `create_segmenter` builds from, made once by
    `check_net_kwargs`. `net_kwargs` is the description as a file records it (the budget
    resolved to `policy_schedule` = (U, S), the policy backbone as built)."""

    crop: tuple[int, int]
    patch_size: int
    reduction: Reduction
    num_notshared: int  # U (CTS); N otherwise
    policy_backbone: str | None  # policy_net only
    policynet_ckpt: str | None
    net_kwargs: dict  # the recorded description
    complete: dict  # the same with the preset fields filled in: what the model is built from

    @property
    def policy_method(self) -> str:
        return self.reduction.policy_method

    @property
    def num_shared(self) -> int:
        return self.reduction.num_shared

    @property
    def grid(self) -> tuple[int, int]:
        return self.crop[0] // self.patch_size, self.crop[1] // self.patch_size

    @property
    def shares_tokens(self) -> bool:
        return self.reduction.reduces


# --------------------------------------------------------------------------- model description
def build_net_kwargs(
    backbone: str,
    decoder: str,
    n_cls: int,
    crop_size,
    *,
    dropout: float = 0.0,
    drop_path_rate: float = 0.1,
    decoder_layers: int | None = None,
    policy_method: str = "no_sharing",
    num_shared: int | None = None,
    num_notshared: int | None = None,
    token_reduction: float | None = None,
    policynet_ckpt: str | None = None,
    policy_backbone: str | None = None,
    policy_ckpt_required: bool = False,
    **extra,
) -> dict:
    """The reference `net_kwargs` of a model, validated (`check_net_kwargs`).

    `num_shared`/`token_reduction` give S (U is derived; `num_notshared`, when given, must
    agree). For `policy_net`, the policy backbone defaults to the one recorded beside
    `policynet_ckpt`; a given one must agree with that record. Extra keys (`layer_norm_eps`,
    `n_layers`, `random_seed`, `oracle_dataset`, ...) are recorded when not None.
    """
    cfg = load_config()
    if backbone not in cfg["model"]:
        raise ModelConfigError(f"unknown backbone {backbone!r}; choose one of: {', '.join(cfg['model'])}")
    if decoder not in cfg["decoder"]:
        raise ModelConfigError(f"unknown decoder {decoder!r}; choose one of: {', '.join(cfg['decoder'])}")
    check_policy_method(policy_method)
    check_policy_options(policy_method, policynet_ckpt, policy_backbone)
    net = dict(cfg["model"][backbone])
    net["image_size"] = pair(crop_size)
    net["backbone"] = backbone
    net["dropout"] = dropout
    net["drop_path_rate"] = drop_path_rate
    dec = dict(cfg["decoder"][decoder])
    if decoder_layers is not None and decoder == "mask_transformer":
        dec["n_layers"] = decoder_layers
    dec["name"] = decoder
    dec["n_cls"] = n_cls
    net["decoder"] = dec
    net["n_cls"] = n_cls
    net["policy_method"] = policy_method
    net.update({k: v for k, v in extra.items() if v is not None})
    # the budget as given; check_net_kwargs replaces it with the resolved (U, S)
    net["policy_schedule"] = (num_notshared, num_shared)
    if token_reduction is not None:
        net["token_reduction"] = token_reduction
    net["policynet_ckpt"] = policynet_ckpt
    if uses_policy_net(policy_method):
        net["policy_backbone"] = policy_backbone
    return check_net_kwargs(net, policy_ckpt_required=policy_ckpt_required).net_kwargs


def complete_net_kwargs(net: dict) -> dict:
    """A copy with the preset fields a hand-written description may leave out."""
    net = copy.deepcopy(net)
    cfg = load_config()
    backbone = net.get("backbone")
    if backbone in cfg["model"]:
        for k, v in cfg["model"][backbone].items():
            net.setdefault(k, v)
    missing = [k for k in ("image_size", "patch_size", "d_model", "n_heads", "n_layers", "n_cls", "decoder") if k not in net]
    if missing:
        raise ModelConfigError(f"model config lacks {missing}; give a known `backbone` or these fields")
    if isinstance(net["decoder"], str):
        net["decoder"] = {"name": net["decoder"], **cfg["decoder"].get(net["decoder"], {})}
    return net


def check_net_kwargs(net: dict, *, policy_ckpt_required: bool = True) -> ModelSpec:
    """Validates a model description; the only place the model's rules are checked.

    Crop: a multiple of the patch size, and of twice the patch size when tokens are shared
    (superpatches are 2×2 patches). Budget: `policy_schedule` (U, S) with U = N − 4S (or
    `token_reduction`). policy_net: patch size 16, a policy checkpoint that exists (unless
    `policy_ckpt_required=False`: the policy weights then come from a segmentation checkpoint)
    and a backbone that matches the one recorded beside it. A `reducer` entry names another
    registered reducer and its settings.
    """
    complete = complete_net_kwargs(net)
    method = complete.get("policy_method", NO_SHARING)
    check_policy_method(method)
    crop, p = pair(complete["image_size"]), int(complete["patch_size"])
    grid = (crop[0] // p, crop[1] // p)
    check_crop(policy_reduction(method, 0), crop, p)
    u, s = complete.get("policy_schedule") or (None, None)
    u, s = resolve_token_budget(grid, method, s, u, complete.get("token_reduction"))
    reduction = _reduction(complete, method, s, grid)
    ckpt = complete.get("policynet_ckpt")
    backbone = resolve_policy_backbone(method, p, complete, policy_ckpt_required=policy_ckpt_required)
    recorded_net = _recorded(net, (u, s), backbone, reduction)
    return ModelSpec(crop, p, reduction, u, backbone, ckpt, recorded_net,
                     _recorded(complete, (u, s), backbone, reduction))


def _reduction(net: dict, method: str, num_shared: int, grid: tuple[int, int]) -> Reduction:
    """CTS from `policy_method` (the reference's spelling), or the registered reducer a
    `reducer: {name: ..., settings}` entry names (stacked on CTS when a policy shares tokens)."""
    entry = net.get("reducer")
    cts = policy_reduction(method, num_shared)
    if entry is None:
        return cts
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ReductionError(f"net_kwargs `reducer` must be a mapping with a `name`, got {entry!r}")
    return registered_reduction(entry, grid, under=cts)


def _recorded(net: dict, budget: tuple[int, int], backbone: str | None, reduction: Reduction) -> dict:
    """A copy of `net` with the budget and backbone it resolves to: `policy_schedule` = (U, S),
    no `token_reduction`, `policy_backbone` as built (left out when nothing records one), and a
    `reducer` entry with every setting (defaults filled in)."""
    net = copy.deepcopy(net)
    if net.get("reducer") is not None:
        net["reducer"] = reducer_record(reduction)
    net["policy_schedule"] = budget
    net.pop("token_reduction", None)
    if backbone is not None:
        net["policy_backbone"] = backbone
    else:
        net.pop("policy_backbone", None)
    return net
