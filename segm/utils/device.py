"""The one rule for a `--device` given on a command line (training, evaluation, inference,
benchmark): auto, cpu, cuda or cuda:N, refused with one message when unknown or unavailable."""
from __future__ import annotations

import re

import torch

__all__ = ["DeviceError", "DEVICE_HELP", "resolve_device"]

DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda or cuda:N"
_CUDA = re.compile(r"cuda(?::(\d+))?")


class DeviceError(ValueError):
    """A device name that is unknown or names hardware this machine lacks."""


def resolve_device(name: str | None = "auto", *, local_rank: int = 0) -> torch.device:
    """The torch device `name` names: `auto` (or None) is `cuda:local_rank` when CUDA is
    available, else the CPU; `cuda` is `cuda:local_rank`. Raises DeviceError."""
    text = "auto" if name is None else str(name).strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    if text == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    found = _CUDA.fullmatch(text)
    if found is None:
        raise DeviceError(f"unknown device {name!r}: use {DEVICE_HELP}")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} needs CUDA, but no CUDA device is available: use --device cpu")
    index = int(found.group(1)) if found.group(1) is not None else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {name!r}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", index)
