"""The policy trainer's optimizers, by command-line name."""
from __future__ import annotations

import torch

OPTIMIZERS = ("AdamW", "SGD", "Adam")


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
