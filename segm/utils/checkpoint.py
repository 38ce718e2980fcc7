"""Crash-safe checkpoint writing and restricted (weights-only) loading."""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

__all__ = ["CheckpointError", "atomic_write", "atomic_write_text", "atomic_torch_save", "safe_torch_load"]


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read safely."""


def atomic_write(path, write, *, binary: bool = True) -> None:
    """Calls `write(file)` on a temporary file in the target folder, fsyncs it, then renames it
    over `path`: readers see the old file or the complete new one, never a partial one, and a
    failure leaves nothing behind."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Persist the rename itself (best effort: not every file system allows it).
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


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
