"""Optimiser factory and the per-iteration polynomial schedule (docs/DESIGN.md, "Training recipe")."""
from __future__ import annotations

import glob

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

__all__ = ["param_groups", "create_optimizer", "PolynomialLR"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, split by timm's `param_groups_weight_decay` as timm 0.4.12's
    `add_weight_decay` did for the reference: [no-decay group (1-D params, biases,
    `model.no_weight_decay()` names), decay group]; at wd = 0 a single group. Frozen parameters
    (requires_grad False) are left out."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    skip = sorted(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else ()
    # the names are exact: escape the characters timm's pattern matching would interpret
    exact = [glob.escape(name) for name in skip]
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=exact)


def create_optimizer(
    model: nn.Module, opt: str = "sgd", *, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """`sgd`: SGD with Nesterov momentum; `adamw`: AdamW (decoupled weight decay)."""
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
    groups = param_groups(model, weight_decay)
    opt = opt.lower()
    if opt == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, weight_decay=0.0)
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {opt!r}: choose 'sgd' or 'adamw'")


class PolynomialLR:
    """Polynomial decay with optional linear warm-up, stepped once per iteration.

    With t = number of updates, T = iter_max, w = warmup_iter, p = power:
        coef(t) = (t/w)·(1 − w/T)^p  if t < w  else  (1 − t/T)^p
        lr(t)   = (lr0 − min_lr)·coef(t) + min_lr
    At t = 0 and for t > T the current lr is kept, so the first iteration runs at lr0.
    Call `step_update(num_updates)` after each optimiser step.
    """

    def __init__(
        self, optimizer, lr0: float, iter_max: int, warmup_iter: int = 0, min_lr: float = 1e-5, power: float = 0.9
    ):
        if iter_max < 1:
            raise ValueError(f"iter_max must be >= 1, got {iter_max}")
        if not 0 <= warmup_iter < iter_max:
            raise ValueError(f"warmup_iter must be in [0, iter_max={iter_max}), got {warmup_iter}")
        self.optimizer = optimizer
        self.lr0 = float(lr0)
        self.iter_max = int(iter_max)
        self.warmup_iter = int(warmup_iter)
        self.min_lr = float(min_lr)
        self.power = float(power)
        self.num_updates = 0

    def lr_at(self, t: int) -> float | None:
        """The scheduled lr after t updates, or None where the current lr is kept."""
        if t == 0 or t > self.iter_max:
            return None
        T, w, p = self.iter_max, self.warmup_iter, self.power
        coef = (t / w) * (1 - w / T) ** p if t < w else (1 - t / T) ** p
        return (self.lr0 - self.min_lr) * coef + self.min_lr

    def step_update(self, num_updates: int) -> None:
        self.num_updates = int(num_updates)
        lr = self.lr_at(self.num_updates)
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        keys = ("lr0", "iter_max", "warmup_iter", "min_lr", "power", "num_updates")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by this class, or by the reference scheduler (a torch
        `_LRScheduler` whose `last_epoch` counts the updates)."""
        if "num_updates" in state:
            for k in ("lr0", "iter_max", "warmup_iter", "min_lr", "power", "num_updates"):
                setattr(self, k, type(getattr(self, k))(state[k]))
        elif "last_epoch" in state and "iter_max" in state:
            self.lr0 = float(state["base_lrs"][0])
            self.iter_max = int(state["iter_max"])
            self.warmup_iter = int(state.get("iter_warmup", 0))
            self.min_lr = float(state.get("min_lr", 0.0))
            self.power = float(state["power"])
            self.num_updates = int(state["last_epoch"])
        else:
            raise KeyError(f"not a PolynomialLR state dict (keys: {sorted(state)})")
