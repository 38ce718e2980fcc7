"""Folders a command writes to, checked before any work is done, and the one-line form of a
write that failed. No torch import: the dataset preparation scripts use it too."""
from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["NotWritableError", "check_writable", "is_out_of_space", "write_error_message"]

_REASONS = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


class NotWritableError(ValueError):
    """A folder the command was asked to write to cannot be written."""


def check_writable(folder, what: str, *, fix: str = "choose a folder you can write to") -> None:
    """Raises NotWritableError ("WHAT FOLDER: the problem; FIX") unless `folder` can be written,
    or created with its parents: the nearest existing entry on its path must be a folder this
    process may write to."""
    folder = Path(folder)
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotWritableError(f"{what} {folder}: {existing} is a file, not a folder; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NotWritableError(
            f"{what} {folder}: cannot write to {existing} (read-only or permission denied); {fix}"
        )


def is_out_of_space(e: OSError) -> bool:
    """A write refused by the disk itself: full, over quota, or read-only."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def write_error_message(e: OSError, path=None) -> str:
    """'cannot write PATH: REASON' for a failed write (`path` defaults to the error's file); an
    error raised with a message of its own (no errno) keeps it."""
    if e.errno is None:
        return str(e)
    path = path if path is not None else (e.filename or "the file")
    return f"cannot write {path}: {_REASONS.get(e.errno) or e.strerror or str(e)}"
