"""Shared machinery of the dataset preparation scripts (ADE20K, Cityscapes, Pascal-Context).

Every script runs the same steps (`run_prepare`):

1. If `<root>/.prepared.json` (the completion marker) is valid, do nothing.
2. Obtain the archives: `--archive` files (matched by file name), then `--download-dir`,
   then `<root>/downloads/`; whatever is still missing is downloaded into
   `<root>/downloads/` unless local sources were given (offline mode), in which case
   the run stops with a message naming each missing file and where to get it.
3. Build the dataset tree inside a temporary sibling folder `<root>/.prepare-tmp-*`.
4. Move the finished top-level entries into `<root>`, replacing any older copy.
5. Write the marker, last. A tree without a valid marker is never trusted: an
   interrupted run is simply redone from the archives by the next run.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

from tqdm import tqdm

from segm.utils.atomic import atomic_write_text
from segm.utils.download import Checksum, ChecksumError, DownloadError, download, move_aside, verify_checksum
from segm.utils.writable import NotWritableError, check_writable

MARKER_NAME = ".prepared.json"
LOCK_NAME = ".prepare.lock"
DOWNLOADS = "downloads"
_TMP_PREFIX = ".prepare-tmp-"
_MARKER_FORMAT = 1


class PrepareError(RuntimeError):
    """Preparation cannot go on; the message names the file at fault and the fix."""


@dataclass(frozen=True)
class Resource:
    """A file the preparation needs: its name, where it is downloaded from, its digest."""

    filename: str
    url: str
    checksum: Checksum | None = None
    manual: str = ""  # how to get the file by hand, for the "missing archive" message


Fetch = Callable[[Resource, Path], Path]  # (resource, destination) -> downloaded file


def default_fetch(resource: Resource, dest: Path) -> Path:
    return download(resource.url, dest, checksum=resource.checksum)


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def is_downloaded(path: Path, root: Path) -> bool:
    """True if `path` lives in `<root>/downloads` (a file this tool owns and may move aside)."""
    return _is_inside(Path(path), Path(root) / DOWNLOADS)


def _where_to_get(r: Resource) -> str:
    text = f"{r.filename}: download {r.url}"
    if r.checksum is not None:
        text += f" ({r.checksum})"
    return text + (f"; {r.manual}" if r.manual else "")


def local_sources(resources: Sequence[Resource], download_dir,
                  archives: Iterable) -> tuple[dict[str, Path], Path | None]:
    """The `--archive` files by file name and the `--download-dir`, checked (no file is read)."""
    by_name: dict[str, Path] = {}
    for a in map(Path, archives):
        if not a.is_file():
            raise PrepareError(f"--archive {a}: no such file")
        by_name[a.name] = a
    expected = [r.filename for r in resources]
    unknown = sorted(set(by_name) - set(expected))
    if unknown:
        raise PrepareError(
            f"unexpected --archive {', '.join(unknown)}: archives are matched by file name, "
            f"and this dataset needs {', '.join(expected)}"
        )
    download_dir = Path(download_dir) if download_dir is not None else None
    if download_dir is not None and not download_dir.is_dir():
        raise PrepareError(f"--download-dir {download_dir}: no such folder")
    return by_name, download_dir


def obtain(
    resources: Sequence[Resource],
    downloads: Path,
    *,
    download_dir=None,
    archives: Iterable = (),
    fetch: Fetch | None = None,
) -> dict[str, Path]:
    """Map each resource's file name to a verified local file (see the module docstring)."""
    by_name, download_dir = local_sources(resources, download_dir, archives)
    offline = download_dir is not None or bool(by_name)

    located: dict[str, Path | None] = {}
    for r in resources:
        candidates = [by_name.get(r.filename), download_dir / r.filename if download_dir else None,
                      downloads / r.filename]
        located[r.filename] = next((p for p in candidates if p is not None and p.is_file()), None)
    missing = [r for r in resources if located[r.filename] is None]
    if offline and missing:  # reported before any long hashing or download
        looked = ["--archive files"] * bool(by_name) + [str(download_dir)] * (download_dir is not None) + [str(downloads)]
        raise PrepareError(
            f"missing {', '.join(r.filename for r in missing)} (looked in {', '.join(looked)}); "
            f"{'; '.join(_where_to_get(r) for r in missing)}. Then pass --archive PATH or put the "
            "file in --download-dir, or run without --download-dir/--archive to download it"
        )

    found: dict[str, Path] = {}
    for r in resources:
        path = located[r.filename]
        try:
            if path is not None:
                verify_checksum(path, r.checksum, quarantine=_is_inside(path, downloads))
            else:
                downloads.mkdir(parents=True, exist_ok=True)
                path = (fetch or default_fetch)(r, downloads / r.filename)
        except ChecksumError as e:
            raise PrepareError(f"{e}; it is not the expected file. Get it again: {_where_to_get(r)}") from None
        except DownloadError as e:
            raise PrepareError(
                f"{e}. Without internet, get the file elsewhere and pass --archive PATH or "
                f"--download-dir DIR: {_where_to_get(r)}"
            ) from None
        found[r.filename] = path
    return found


def extract(archive: Path, dest: Path, *, quarantine: bool = False) -> None:
    """Extract a zip or tar archive into `dest`; a corrupt archive raises PrepareError.

    With `quarantine` (an archive this tool downloaded), a corrupt archive is moved aside
    so that the next run downloads it again instead of trusting it.
    """
    archive = Path(archive)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for member in tqdm(zf.infolist(), desc=f"unzip {archive.name}", unit="file", leave=False):
                    zf.extract(member, dest)  # checks each member's CRC-32
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                for member in tqdm(tf, desc=f"untar {archive.name}", unit="file", leave=False):
                    tf.extract(member, dest, filter="data")
        else:
            raise zipfile.BadZipFile("neither a zip nor a tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        msg = f"{archive} is corrupt or incomplete ({e})"
        if quarantine:
            msg += f"; it was moved aside to {move_aside(archive)}, run again to download it anew"
        else:
            msg += "; replace it with a good copy"
        raise PrepareError(msg) from None


def require_layout(base: Path, relpaths: Iterable[str], archive_names: str) -> None:
    """Fail with a clear message if the extracted archives lack an expected path."""
    absent = [p for p in relpaths if not (base / p).exists()]
    if absent:
        raise PrepareError(
            f"{archive_names} do not have the expected layout: missing {', '.join(absent)} "
            "after extraction (wrong or truncated archive?)"
        )


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (same file system), else copy it; the original stays."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --- completion marker ----------------------------------------------------------------


def read_marker(root: Path) -> dict | None:
    try:
        with open(root / MARKER_NAME) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_prepared(root: Path, name: str) -> bool:
    """True if the marker is valid and every entry it lists exists."""
    m = read_marker(root)
    return (
        m is not None
        and m.get("dataset") == name
        and m.get("format") == _MARKER_FORMAT
        and isinstance(m.get("entries"), list)
        and all((root / e).exists() for e in m["entries"])
    )


def _write_marker(root: Path, name: str, entries: list[str]) -> None:
    data = {
        "dataset": name,
        "format": _MARKER_FORMAT,
        "entries": entries,
        "prepared_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(root / MARKER_NAME, json.dumps(data, indent=2) + "\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# --- the whole run --------------------------------------------------------------------


def run_prepare(
    root,
    *,
    name: str,
    resources: Sequence[Resource],
    build: Callable[[dict[str, Path], Path], None],
    force: bool = False,
    download_dir=None,
    archives: Iterable = (),
    fetch: Fetch | None = None,
) -> bool:
    """Prepare `root` (e.g. `$DATASET/ade20k`); return False if it was already prepared.

    `build(files, tmp)` receives {file name: local archive} and fills the temporary
    folder `tmp` with the final top-level entries.
    """
    root = Path(root)
    if not force and is_prepared(root, name):
        print(f"{name} is already prepared in {root} (pass --force to prepare it again)")
        return False
    local_sources(resources, download_dir, archives)  # bad options fail before anything is written
    try:
        check_writable(root, f"{name} goes to")
    except NotWritableError as e:
        raise PrepareError(str(e)) from None
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root, name):
        return _run_locked(root, name, resources, build, download_dir, archives, fetch)


@contextlib.contextmanager
def _exclusive(root: Path, name: str):
    """Refuse to run two preparations of the same folder at once (they would share tmp folders)."""
    with open(root / LOCK_NAME, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrepareError(f"another preparation of {name} is running in {root}; wait for it to end") from None
        yield


def _run_locked(root, name, resources, build, download_dir, archives, fetch) -> bool:
    downloads = root / DOWNLOADS
    files = obtain(resources, downloads, download_dir=download_dir, archives=archives, fetch=fetch)

    for stale in root.glob(_TMP_PREFIX + "*"):  # left by an interrupted run
        _remove(stale)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    try:
        build(files, tmp)
        entries = sorted(p.name for p in tmp.iterdir())
        clash = {DOWNLOADS, MARKER_NAME, LOCK_NAME}.intersection(entries)
        if clash:
            raise PrepareError(f"the archives of {name} contain a top-level {', '.join(sorted(clash))}, refusing to overwrite")
        (root / MARKER_NAME).unlink(missing_ok=True)
        for entry in entries:
            _remove(root / entry)
            os.replace(tmp / entry, root / entry)
        _write_marker(root, name, entries)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{name} prepared in {root}")
    return True


@contextlib.contextmanager
def cli_errors(*also: type[Exception]):
    """A preparation that cannot go on ends the command with one line (click's `Error: ...`);
    `also`: further exception types that mean it (the synthetic generator's ValueError)."""
    import click

    try:
        yield
    except (PrepareError, DownloadError, OSError, *also) as e:  # OSError: a full disk, a read-only folder
        raise click.ClickException(str(e)) from None


def local_file_options(what: str = "archive"):
    """The `--download-dir`, `--archive` and `--force` options every prepare CLI shares."""
    import click

    def decorate(f):
        f = click.option("--force", is_flag=True, help="Prepare again even if a completion marker exists.")(f)
        f = click.option("--archive", "archives", multiple=True, type=click.Path(exists=True, dir_okay=False),
                         help=f"An already-downloaded {what}, matched by file name (repeatable; "
                         "no download is attempted).")(f)
        return click.option("--download-dir", type=click.Path(exists=True, file_okay=False),
                            help=f"Folder holding already-downloaded {what}s (no download is attempted).")(f)

    return decorate
