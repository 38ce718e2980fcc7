"""One writer per folder: an exclusive `fcntl.flock` on `FOLDER/.lock`, held while a run
writes there. The kernel releases it when the holder exits, however it exits (SIGKILL
included), so a stale lock cannot block a folder. The file stays (removing it would let a
third process lock a new file while a second still waits on the old one); it holds the
holder's pid, host and start time, for the message that refuses a second writer.
No torch import here."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
import warnings
from pathlib import Path

__all__ = ["FolderLock", "FolderLockedError", "LOCK_NAME", "check_unlocked", "lock_folder"]

LOCK_NAME = ".lock"
_MAX_HOLDER_BYTES = 512


class FolderLockedError(ValueError):
    """Another process holds the folder's lock."""


class FolderLock:
    """A held lock; `release()` (or leaving a `with` block) gives it up."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self._fd = fd  # None: the file system does not lock; nothing to release

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, _MAX_HOLDER_BYTES, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "a process that has not said who it is yet"


def _refusal(folder: Path, fd: int, what: str) -> FolderLockedError:
    return FolderLockedError(f"{folder} is in use by another run (held by {_holder(fd)}): wait for it to end, "
                             f"or choose another {what}")


def _try_lock(fd: int) -> bool:
    """True when this process now holds the lock, False when another one does."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def check_unlocked(folder, what: str = "folder") -> None:
    """Raises FolderLockedError if a process holds `folder`'s lock now; changes nothing on disk
    (an early, cheap refusal; `lock_folder` is the one that counts)."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # no lock file (or none we may read): nobody to refuse for
    try:
        if not _try_lock(fd):
            raise _refusal(Path(folder), fd, what)
    except OSError:
        pass  # a file system without locks: `lock_folder` says so
    finally:
        os.close(fd)  # closing releases a lock taken here


def lock_folder(folder, what: str = "folder") -> FolderLock:
    """Creates `folder` if needed and takes its lock; raises FolderLockedError naming the holder
    (pid and host) when another process has it. On a file system that cannot lock, warns and
    returns a lock that holds nothing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        locked = _try_lock(fd)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        warnings.warn(f"cannot lock {path} ({e.strerror}): a second run on {folder} would not be stopped",
                      stacklevel=2)
        return FolderLock(path, None)
    if not locked:
        refusal = _refusal(folder, fd, what)
        os.close(fd)
        raise refusal
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {started}\n".encode(), 0)
    return FolderLock(path, fd)
