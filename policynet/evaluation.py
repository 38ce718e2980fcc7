"""The evaluation loop shared by `policynet.train` (val and train subsets) and `policynet.eval`."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset

from segm.data.policy_labels import policy_labels, rules_for

from .data import PolicyDataset
from .metrics import PolicyMeter


def build_eval_set(dataset: str, split: str, *, data_root=None, classes_file=None, crop_size=None) -> PolicyDataset:
    """The deterministic view of a split: centred crops, no flip."""
    return PolicyDataset(dataset, split, data_root=data_root, classes_file=classes_file,
                         crop_size=crop_size, train=False)


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
