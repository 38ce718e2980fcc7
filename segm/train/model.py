"""What a run trains: the model description, the Segmenter with its starting weights, the
optimiser, the learning-rate schedule and the gradient scaler."""
from __future__ import annotations

import torch

from segm.model.reduction.rules import parse_reducer, policy_settings
from segm.model.spec import build_net_kwargs
from segm.train.options import ConfigError, TrainOptions, user_errors
from segm.train.state import TrainState
from segm.utils.determinism import seed_everything

POLY_POWER = 0.9
MOMENTUM = 0.9
# timm tags of the ImageNet weights the reference starts from; `--pretrained auto`.
PRETRAINED_TAGS = {
    "vit_tiny_patch16_384": "vit_tiny_patch16_384.augreg_in21k_ft_in1k",
    "vit_small_patch16_384": "vit_small_patch16_384.augreg_in21k_ft_in1k",
    "vit_base_patch16_384": "vit_base_patch16_384.augreg_in21k_ft_in1k",
    "vit_large_patch16_384": "vit_large_patch16_384.augreg_in21k_ft_in1k",
    "vit_small_patch32_384": "vit_small_patch32_384.augreg_in21k_ft_in1k",
    "vit_base_patch32_384": "vit_base_patch32_384.augreg_in21k_ft_in1k",
    "vit_large_patch32_384": "vit_large_patch32_384.orig_in21k_ft_in1k",
    "deit_tiny_distilled_patch16_224": "deit_tiny_distilled_patch16_224.fb_in1k",
    "deit_small_distilled_patch16_224": "deit_small_distilled_patch16_224.fb_in1k",
    "deit_base_distilled_patch16_224": "deit_base_distilled_patch16_224.fb_in1k",
    "deit_base_distilled_patch16_384": "deit_base_distilled_patch16_384.fb_in1k",
}


def model_description(opts: TrainOptions, n_cls: int) -> dict:
    """The validated `net_kwargs` the options describe (raises ConfigError)."""
    extra = {"layer_norm_eps": opts.layer_norm_eps, "n_layers": opts.encoder_layers,
             **policy_settings(opts.policy_method, seed=opts.seed, dataset=opts.dataset)}
    with user_errors():
        extra["reducer"] = parse_reducer(opts.reducer) if opts.reducer else None
        return build_net_kwargs(
            opts.backbone, opts.decoder, n_cls, opts.crop_size, dropout=opts.dropout, drop_path_rate=opts.drop_path,
            decoder_layers=opts.decoder_layers, policy_method=opts.policy_method,
            num_shared=opts.num_tokens_shared, num_notshared=opts.num_tokens_notshared,
            token_reduction=opts.token_reduction, policynet_ckpt=opts.policynet_ckpt,
            policy_backbone=opts.policy_backbone, policy_ckpt_required=True, **extra,
        )


def create_train_state(opts: TrainOptions, net_kwargs: dict, device: torch.device, total_iters: int, *,
                       fresh: bool) -> TrainState:
    """The model (seeded by --seed: identical initial weights on every rank; pretrained
    encoder weights on a `fresh` start), its optimiser, schedule and scaler, at iteration 0."""
    from segm.model import create_segmenter
    from segm.optim import PolynomialLR, create_optimizer

    with user_errors():
        seed_everything(opts.seed)
        model = create_segmenter(net_kwargs)
        # The ImageNet head is kept (and saved) but unused, as in the reference; freezing it lets
        # DDP run without find_unused_parameters. The policy net is frozen by the Segmenter.
        for head in ("head", "head_dist"):
            if isinstance(getattr(model.encoder, head, None), torch.nn.Module):
                getattr(model.encoder, head).requires_grad_(False)
        if fresh:
            load_pretrained(model, opts)
        model.to(device)
        optimizer = create_optimizer(model, opts.optimizer, lr=opts.learning_rate, weight_decay=opts.weight_decay,
                                     momentum=MOMENTUM)
        scheduler = PolynomialLR(optimizer, opts.learning_rate, total_iters, opts.warmup_iter, opts.min_lr,
                                 POLY_POWER)
        scaler = torch.amp.GradScaler(device.type) if opts.autocast_dtype == torch.float16 else None
    return TrainState(model, optimizer, scheduler, scaler)


def load_pretrained(model, opts: TrainOptions) -> None:
    from segm.model.vit import load_pretrained_vit

    source = opts.pretrained
    if source == "none":
        print("no pretrained weights: the encoder starts from a random initialisation")
        return
    if source == "auto":
        source = PRETRAINED_TAGS.get(opts.backbone)
        if source is None:
            print(f"warning: no published ImageNet weights for {opts.backbone}; the encoder starts from a random "
                  "initialisation (pass --pretrained FILE to start from weights)", force=True)
            return
    try:
        load_pretrained_vit(model.encoder, source)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"cannot load pretrained weights {source!r}: {e}") from None
    print(f"encoder initialised from {source}")
