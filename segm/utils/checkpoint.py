"""Crash-safe checkpoint writing and restricted (weights-only) loading."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from segm.utils.atomic import atomic_write

__all__ = ["CheckpointError", "atomic_torch_save", "safe_torch_load"]


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read safely."""


def atomic_torch_save(obj, path) -> None:
    """`torch.save` through `atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def safe_torch_load(path, map_location="cpu"):
    """`torch.load(path, weights_only=True)` with errors that name the file.

    Raises FileNotFoundError for a missing file and CheckpointError for a corrupt file
    or one holding objects other than tensors and plain containers/scalars.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(
                f"{path} holds objects that need arbitrary unpickling ({found.group(1)}), refused for "
                "safety; save plain state dicts (tensors, dicts, lists, numbers, strings) instead"
            ) from None
        raise CheckpointError(f"{path} is corrupt or not a torch checkpoint ({e})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} is corrupt or not a torch checkpoint ({type(e).__name__}: {e})") from None
