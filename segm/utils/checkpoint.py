"""Crash-safe checkpoint writing and restricted (weights-only) loading."""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from segm.utils.atomic import atomic_write
from segm.utils.writable import write_error_message

__all__ = ["CheckpointError", "atomic_torch_save", "safe_torch_load", "state_dict_mismatch"]


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read safely."""


def atomic_torch_save(obj, path) -> None:
    """`torch.save` through `atomic_write`. A write that fails (disk full, permission denied)
    raises CheckpointError naming the file; whatever `path` held before is then unchanged."""
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(write_error_message(e, path)) from None
    except RuntimeError as e:
        # torch reports a failed write of its zip container as "[enforce fail at inline_container.cc]",
        # with the OSError, when there was one, as the context
        if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
            raise
        cause = e.__context__
        if isinstance(cause, OSError):
            raise CheckpointError(write_error_message(cause, path)) from None
        raise CheckpointError(f"cannot write {path}: the write failed (is the disk full?)") from None


def safe_torch_load(path, map_location="cpu"):
    """`torch.load(path, weights_only=True)` with errors that name the file.

    Raises FileNotFoundError for a missing file and CheckpointError for a corrupt file
    or one holding objects other than tensors and plain containers/scalars. Nothing is ever
    unpickled beyond those, and no message suggests loading with `weights_only=False`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol is refused below, not warned about
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise CheckpointError(f"{path} is corrupt or not a torch checkpoint ({_first_line(e)})") from None
        found = re.search(r"GLOBAL (\S+)", str(e))
        if not found and not _is_pickle(path):
            raise CheckpointError(f"{path} is corrupt or not a torch checkpoint") from None
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path} contains objects that are not allowed{what} and will not be loaded: this project "
            "reads only tensors and plain containers, numbers and strings; re-save it as a plain state dict"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} is corrupt or not a torch checkpoint ({type(e).__name__}: {_first_line(e)})") from None


def _is_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"  # the PROTO opcode that starts every pickle since protocol 2


def _first_line(e: BaseException) -> str:
    """The first sentence of an error, without torch's advice to load with weights_only=False
    (nor its paragraph on what may have corrupted the file)."""
    lines = [ln for ln in str(e).splitlines() if ln.strip() and "weights_only" not in ln]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(e).__name__


def state_dict_mismatch(module: torch.nn.Module, state: dict, *, ignore_missing: tuple[str, ...] = ()) -> str | None:
    """What keeps `state` from loading strictly into `module`, naming the first missing,
    unexpected and mis-shaped keys (None when it fits). Torch's own message starts with a
    line that names none of them."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(ignore_missing)]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]

    def first(names: list, what: str) -> str:
        more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
        return f"{len(names)} {what}: {', '.join(names[:3])}{more}"

    parts = [first(n, w) for n, w in ((missing, "missing keys"), (unexpected, "unexpected keys"),
                                      (shapes, "shape mismatches")) if n]
    return "; ".join(parts) or None
