"""Mixed precision: the dtype names of the `--amp`/`--amp-dtype` options and the one autocast
context that training, evaluation and inference use."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["AMP_DTYPES", "autocast"]

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device_type: str, amp_dtype: torch.dtype | None = None):
    """`torch.autocast` to `amp_dtype` on `device_type`; no autocast when it is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=amp_dtype)
