"""Building, saving and loading Segmenter models.

`net_kwargs` is the reference's model description (SPEC §5.4, `variant.yml`): the backbone
preset (`image_size` = crop, `patch_size`, `d_model`, `n_heads`, `n_layers`, `normalization`,
`distilled`), `backbone`, `dropout`, `drop_path_rate`, `decoder` {`name`, ..., `n_cls`},
`n_cls`, and for CTS `policy_method`, `policy_schedule` = (U, S), `policynet_ckpt`.
This project adds optional keys: `layer_norm_eps` (default 1e-5, as the reference),
`policy_backbone`, `random_seed`, `oracle_dataset`, `pretrained`.
"""
from __future__ import annotations

import copy
from pathlib import Path


from segm.config import dump_yaml, load_config, load_yaml
from segm.model import cts
from segm.model.decoder import create_decoder
from segm.model.policy_net import checkpoint_backbone, load_policy_checkpoint
from segm.model.segmenter import POLICY_METHODS, Segmenter
from segm.model.vit import _pair, create_vit, load_pretrained_vit
from segm.utils.checkpoint import atomic_torch_save, safe_torch_load

CHECKPOINT_FORMAT = "segm-cts/1"


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
    **extra,
) -> dict:
    """The reference `net_kwargs` for a training run; validates the token budget first."""
    cfg = load_config()
    if backbone not in cfg["model"]:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of: {', '.join(cfg['model'])}")
    if decoder not in cfg["decoder"]:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of: {', '.join(cfg['decoder'])}")
    if policy_method not in POLICY_METHODS:
        raise ValueError(f"unknown policy method {policy_method!r}; choose one of: {', '.join(POLICY_METHODS)}")
    net = dict(cfg["model"][backbone])
    h, w = _pair(crop_size)
    p = net["patch_size"]
    if h % p or w % p:
        raise cts.TokenBudgetError(f"crop {h}×{w} is not a multiple of the patch size {p}")
    if policy_method != "no_sharing" and (h % (2 * p) or w % (2 * p)):
        raise cts.TokenBudgetError(
            f"token sharing needs a crop that is a multiple of {2 * p} (2× the patch size); got {h}×{w}"
        )
    u, s = cts.resolve_token_budget((h // p, w // p), policy_method, num_shared, num_notshared, token_reduction)
    net["image_size"] = (h, w)
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
    net["policy_schedule"] = (u, s)
    net["policynet_ckpt"] = policynet_ckpt
    if policy_method == "policy_net" and extra.get("policy_backbone") is None and policynet_ckpt:
        extra["policy_backbone"] = checkpoint_backbone(policynet_ckpt)  # as the policy was trained
    net.update({k: v for k, v in extra.items() if v is not None})
    return net


def _complete(net: dict) -> dict:
    """Fills preset fields a hand-written config may leave out."""
    net = copy.deepcopy(net)
    presets = load_config()["model"]
    backbone = net.get("backbone")
    if backbone in presets:
        for k, v in presets[backbone].items():
            net.setdefault(k, v)
    missing = [k for k in ("image_size", "patch_size", "d_model", "n_heads", "n_layers", "n_cls", "decoder") if k not in net]
    if missing:
        raise ValueError(f"model config lacks {missing}; give a known `backbone` or these fields")
    if isinstance(net["decoder"], str):
        net["decoder"] = {"name": net["decoder"], **load_config()["decoder"].get(net["decoder"], {})}
    return net


def create_segmenter(cfg: dict, *, policy_ckpt_required: bool = True) -> Segmenter:
    """Builds a Segmenter from `net_kwargs` (the reference's, exactly as in its variant.yml, or
    this project's). With `policy_ckpt_required=False` a missing `policynet_ckpt` is allowed:
    the policy weights then come from a segmentation checkpoint loaded afterwards."""
    net = _complete(cfg)
    policy_method = net.get("policy_method", "no_sharing")
    h, w = _pair(net["image_size"])
    p = net["patch_size"]
    u, s = net.get("policy_schedule") or (None, None)
    if s is None and policy_method != "no_sharing" and net.get("token_reduction") is None:
        raise cts.TokenBudgetError(f"policy {policy_method!r} needs `policy_schedule` (U, S) in the model config")
    u, s = cts.resolve_token_budget((h // p, w // p), policy_method, s, u, net.get("token_reduction"))
    eps = float(net.get("layer_norm_eps", 1e-5))
    encoder = create_vit(
        (h, w), p, net["d_model"], net["n_heads"], net["n_layers"], d_ff=net.get("d_ff"),
        distilled=bool(net.get("distilled", False)), dropout=net.get("dropout", 0.0),
        drop_path_rate=net.get("drop_path_rate", 0.0), layer_norm_eps=eps,
    )
    dec = dict(net["decoder"])
    name = dec.pop("name")
    n_cls = dec.pop("n_cls", net["n_cls"])
    dec.pop("encoder_layer", None)
    decoder = create_decoder(name, n_cls, net["d_model"], layer_norm_eps=eps, **dec)
    model = Segmenter(
        encoder, decoder, n_cls, policy_method=policy_method, num_shared=s,
        policy_backbone=net.get("policy_backbone", "efficientnet_lite0"),
        random_seed=int(net.get("random_seed", 0)), oracle_dataset=net.get("oracle_dataset"),
    )
    if net.get("pretrained"):
        load_pretrained_vit(model.encoder, net["pretrained"])
    if policy_method == "policy_net":
        ckpt = net.get("policynet_ckpt")
        if ckpt and Path(ckpt).is_file():
            load_policy_checkpoint(model.policy_net, ckpt)
        elif policy_ckpt_required:
            raise FileNotFoundError(
                f"policy-network checkpoint {'not given' if not ckpt else f'not found: {ckpt}'}; "
                "pass --policynet-ckpt PATH/model.pth (train one with `python -m policynet.train`)"
            )
    return model


# --------------------------------------------------------------------------- checkpoints
def save_model(model: Segmenter, variant: dict, path, **extra) -> None:
    """The project's format: {'model': state, 'variant': variant, 'format', ...} (atomic)."""
    state = {"model": model.state_dict(), "variant": variant, "format": CHECKPOINT_FORMAT, "n_cls": model.n_cls}
    state.update(extra)
    atomic_torch_save(state, path)


def load_model(path, map_location="cpu") -> tuple[Segmenter, dict]:
    """Loads a checkpoint of this project or of the reference (`checkpoint.pth` with its
    `variant.yml` beside it). Returns (model in eval mode, variant)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pth"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = safe_torch_load(path, map_location=map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a Segmenter checkpoint (no 'model' entry)")
    variant_file = path.parent / "variant.yml"
    if variant_file.is_file():
        variant = load_yaml(variant_file)
    elif isinstance(ckpt.get("variant"), dict):
        variant = ckpt["variant"]
    else:
        raise FileNotFoundError(
            f"no variant.yml next to {path}: reference checkpoints need the variant.yml of their "
            "run in the same folder"
        )
    if "net_kwargs" not in variant:
        raise ValueError(f"the variant of {path} has no net_kwargs")
    model = create_segmenter(variant["net_kwargs"], policy_ckpt_required=False)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit its variant: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, variant


def write_variant(variant: dict, log_dir) -> None:
    dump_yaml(variant, Path(log_dir) / "variant.yml")
