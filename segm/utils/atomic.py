"""Crash-safe file writes: every file the project writes goes through `atomic_write` (one file)
or `atomic_write_all` (files that belong together, such as an exported graph and its sidecar).
No torch import here, so light commands (dataset preparation) stay fast to start.

A write goes to a temporary sibling `.NAME.<random>.tmp`, created with mode 0666 so that the
kernel applies the umask (and a folder's default ACL) exactly as a plain open() does; the
process umask is never changed. Errors name the destination, never the temporary file."""
from __future__ import annotations

import glob
import os
import secrets
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["atomic_write", "atomic_write_all", "atomic_write_text", "remove_stale_temps", "temp_pattern"]


def temp_pattern(name: str) -> str:
    """The glob pattern of the temporary files of writes to a file called `name`."""
    return f".{glob.escape(name)}.*.tmp"


def remove_stale_temps(path) -> None:
    """Removes the temporary files that interrupted writes to `path` left in its folder."""
    path = Path(path)
    for tmp in path.parent.glob(temp_pattern(path.name)):
        tmp.unlink(missing_ok=True)


def _named(e: OSError, path: Path, tmp: Path | None) -> OSError:
    """`e` naming `path` where it named the temporary file or nothing; an error about another
    file (one that `write` reads, say) is left as it is."""
    if e.errno is None or e.filename not in (None, str(tmp)):
        return e
    return OSError(e.errno, e.strerror, str(path))  # OSError picks the subclass from errno


def _create_temp(path: Path) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise _named(e, path, tmp) from None
    raise FileExistsError(f"cannot write {path}: no free temporary name in {path.parent}")


def _write_temp(path: Path, write: Callable, binary: bool) -> Path:
    """`write(file)` on a new temporary sibling of `path`, flushed and fsynced; its path."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    tmp = None
    try:
        fd, tmp = _create_temp(path)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        return tmp
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _named(e, path, tmp) from None
        raise


def _fsync_folder(folder: Path) -> None:
    """Persists renames in `folder` (best effort: not every file system allows it)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_all(files: Iterable[tuple[Path, Callable, bool]]) -> None:
    """Writes several files, each `(path, write, binary)`: every one goes to its temporary
    sibling first; only when all are complete are they renamed over their paths, in the given
    order. A failure before the renames leaves every path as it was and no temporary file.
    A crash between two renames can leave new files beside old ones: put last the file that
    vouches for the others (an export's sidecar records its graph's digest)."""
    files = [(Path(p), w, b) for p, w, b in files]
    temps = []
    try:
        for path, write, binary in files:
            temps.append((_write_temp(path, write, binary), path))
        for tmp, path in temps:
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise _named(e, path, tmp) from None
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    for folder in dict.fromkeys(path.parent for _, path in temps):
        _fsync_folder(folder)


def atomic_write(path, write, *, binary: bool = True) -> None:
    """Calls `write(file)` on a temporary file in the target folder, fsyncs it, then renames it
    over `path`: readers see the old file or the complete new one, never a partial one, and a
    failure leaves nothing behind."""
    atomic_write_all([(path, write, binary)])


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)
