"""Building, saving and loading Segmenter models.

`net_kwargs` is the reference's model description (`variant.yml`; docs/DESIGN.md, "Model description"): the backbone
preset (`image_size` = crop, `patch_size`, `d_model`, `n_heads`, `n_layers`, `normalization`,
`distilled`), `backbone`, `dropout`, `drop_path_rate`, `decoder` {`name`, ..., `n_cls`},
`n_cls`, and for CTS `policy_method`, `policy_schedule` = (U, S), `policynet_ckpt`.
This project adds optional keys: `layer_norm_eps` (default 1e-5, as the reference),
`policy_backbone`, `random_seed`, `oracle_dataset`, `pretrained`. `build_net_kwargs` and the
rules it checks live in `segm.model.spec`.
"""
from __future__ import annotations

from pathlib import Path

from segm.config import dump_yaml, load_yaml
from segm.model.decoder import create_decoder
from segm.model.hub import CONFIG, WEIGHTS, check_sizes, is_shared_folder, load_weights, read_shared
from segm.model.shared_schema import SharedFolderError, check_variant_file
from segm.model.reduction import build_reducer
from segm.model.reduction.algm_rules import published_reducer
from segm.model.segmenter import Segmenter
from segm.model.spec import ModelSpec, build_net_kwargs, check_net_kwargs
from segm.model.vit import create_vit, load_pretrained_vit
from segm.utils.checkpoint import atomic_torch_save, safe_torch_load, state_dict_mismatch

__all__ = ["build_net_kwargs", "create_segmenter", "load_model", "reshare", "save_model", "write_variant"]

CHECKPOINT_FORMAT = "segm-cts/1"


def create_segmenter(cfg: dict, *, policy_ckpt_required: bool = True) -> Segmenter:
    """Builds a Segmenter from `net_kwargs` (the reference's, exactly as in its variant.yml, or
    this project's), validated once by `check_net_kwargs`. With `policy_ckpt_required=False` a
    missing `policynet_ckpt` is allowed: the policy weights then come from a segmentation
    checkpoint loaded afterwards."""
    spec = check_net_kwargs(cfg, policy_ckpt_required=policy_ckpt_required)
    net = spec.complete
    eps = float(net.get("layer_norm_eps", 1e-5))
    encoder = create_vit(
        spec.crop, spec.patch_size, net["d_model"], net["n_heads"], net["n_layers"], d_ff=net.get("d_ff"),
        distilled=bool(net.get("distilled", False)), dropout=net.get("dropout", 0.0),
        drop_path_rate=net.get("drop_path_rate", 0.0), layer_norm_eps=eps,
    )
    dec = dict(net["decoder"])
    name = dec.pop("name")
    n_cls = dec.pop("n_cls", net["n_cls"])
    dec.pop("encoder_layer", None)
    decoder = create_decoder(name, n_cls, net["d_model"], layer_norm_eps=eps, **dec)
    model = _with_reduction(encoder, decoder, n_cls, spec)
    if net.get("pretrained"):
        load_pretrained_vit(model.encoder, net["pretrained"])
    return model


def _with_reduction(encoder, decoder, n_cls: int, spec: ModelSpec) -> Segmenter:
    """A Segmenter on `encoder` and `decoder` with the token reduction of `spec`."""
    return Segmenter(encoder, decoder, n_cls, build_reducer(spec.reduction, spec.grid, spec.patch_size, spec.complete))


def reshare(model: Segmenter, net_kwargs: dict, policy_method: str, *, num_shared: int | None = None,
            token_reduction: float | None = None, policynet_ckpt: str | None = None,
            policy_backbone: str | None = None, reducer: dict | None = None) -> tuple[Segmenter, dict]:
    """The same trained encoder and decoder with another token reduction, with no retraining:
    e.g. a `no_sharing` checkpoint evaluated with the content policy, or with a registered
    `reducer` ({name, settings}). Validated like any model description (`check_net_kwargs`; a
    policy_net checkpoint is required). Returns (model in eval mode, its net_kwargs); `model`
    itself is not changed."""
    net = {k: v for k, v in net_kwargs.items() if k not in _POLICY_KEYS}
    net.update(policy_method=policy_method, policy_schedule=(None, num_shared), policynet_ckpt=policynet_ckpt)
    if token_reduction is not None:
        net["token_reduction"] = token_reduction
    if policy_backbone is not None:
        net["policy_backbone"] = policy_backbone
    if reducer is not None:
        net["reducer"] = dict(reducer)
    spec = check_net_kwargs(net, policy_ckpt_required=True)
    shared = _with_reduction(model.encoder, model.decoder, model.n_cls, spec)
    return shared.to(next(model.parameters()).device).eval(), spec.net_kwargs


_POLICY_KEYS = ("policy_method", "policy_schedule", "policynet_ckpt", "policy_backbone", "token_reduction",
                "random_seed", "reducer")


# --------------------------------------------------------------------------- checkpoints
def save_model(model: Segmenter, variant: dict, path, **extra) -> None:
    """The project's format: {'model': state, 'variant': variant, 'format', ...} (atomic)."""
    state = {"model": model.state_dict(), "variant": variant, "format": CHECKPOINT_FORMAT, "n_cls": model.n_cls}
    state.update(extra)
    atomic_torch_save(state, path)


def load_model(path, map_location="cpu") -> tuple[Segmenter, dict]:
    """Loads a checkpoint of this project or of the reference (`checkpoint.pth` with its
    `variant.yml` beside it; the published ALGM code's too, run with ALGM in reference mode), or
    a shared model folder (`segm.share`: safetensors + config.json).
    Returns (model in eval mode, variant)."""
    path = Path(path)
    if is_shared_folder(path):  # closed: nothing but its config.json and model.safetensors is read
        variant, header = read_shared(path)
        model = _built_with(variant, lambda built: load_weights(path, built, header),
                            f"{path / WEIGHTS} does not fit its {CONFIG}",
                            invalid=f"{path / CONFIG}: `variant.net_kwargs` does not describe a model")
        return model.to(map_location), variant
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
    published = published_reducer(variant)
    if published is not None:  # a checkpoint of the published ALGM code
        variant = {**variant, "net_kwargs": {**variant["net_kwargs"], "reducer": published}}
    described_by = variant_file if variant_file.is_file() else path
    check_variant_file(variant, described_by)  # types and ranges, before anything is built
    if isinstance(ckpt["model"], dict):  # sizes against the weights' shapes, before any allocation
        shapes = {k: (str(v.dtype), tuple(v.shape)) for k, v in ckpt["model"].items() if hasattr(v, "shape")}
        check_sizes(variant["net_kwargs"], shapes, described_by, prefix="net_kwargs", weights=path.name,
                    policy=False)
    return _built_with(variant, ckpt["model"], f"checkpoint {path} does not fit the model its variant describes"), variant


def _built_with(variant: dict, state, misfit: str, *, invalid: str | None = None) -> Segmenter:
    """The model `variant` describes with the weights `state` (or `state(model)`), in eval mode;
    a state that does not fit is refused with `misfit` and the first mismatch, a description
    that cannot be built (a reducer's own rules) with `invalid`, when given, and the reason."""
    # the weights come from `state`: a `pretrained` source the description names (a file, a timm
    # name: a download) is never read, whoever wrote the description
    net = {k: v for k, v in variant["net_kwargs"].items() if k != "pretrained"}
    try:
        model = create_segmenter(net, policy_ckpt_required=False)
    except ValueError as e:
        if invalid is None:
            raise
        raise SharedFolderError(f"{invalid}: {str(e).splitlines()[0]}") from None
    if callable(state):
        state = state(model)
    problem = state_dict_mismatch(model, state) if isinstance(state, dict) else "'model' is not a state dict"
    if problem:
        raise ValueError(f"{misfit}: {problem}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def write_variant(variant: dict, log_dir) -> None:
    dump_yaml(variant, Path(log_dir) / "variant.yml")
