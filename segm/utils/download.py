"""Resumable, checksum-verified HTTP downloads (standard library only).

`download()` streams a URL into `<name>.part` with a tqdm progress bar, resumes an
existing `.part` with an HTTP Range request, verifies its full digest and only then
renames the file to its final name, so a file under its final name is always complete. A file whose digest does not match is moved aside to
`<name>.bad` and never used.

`cityscapes_login()` performs the Cityscapes website login (a form POST answered by a
302 redirect) and returns an opener that carries the session cookie in memory.
"""
from __future__ import annotations

import hashlib
import http.cookiejar
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

__all__ = [
    "Checksum",
    "DownloadError",
    "ChecksumError",
    "file_digest",
    "verify_checksum",
    "move_aside",
    "download",
    "cityscapes_login",
    "CITYSCAPES_URL",
]

CITYSCAPES_URL = "https://www.cityscapes-dataset.com"
_USER_AGENT = "segm-prepare/1.0 (python urllib)"


class DownloadError(RuntimeError):
    """A download failed; the message names the URL/file and what to do."""


class ChecksumError(DownloadError):
    """A file's digest does not match the expected one."""


@dataclass(frozen=True)
class Checksum:
    """An expected digest: the full lowercase hex digest (40 digits for SHA-1, 32 for MD5)."""

    algorithm: str  # a hashlib name: "sha1", "md5", ...
    hexdigest: str

    def __post_init__(self):
        size = hashlib.new(self.algorithm).digest_size * 2  # fails early on an unknown algorithm
        if not re.fullmatch(rf"[0-9a-f]{{{size}}}", self.hexdigest):
            raise ValueError(
                f"a {self.algorithm.upper()} checksum is the full digest, {size} lowercase hex digits; "
                f"got {self.hexdigest!r}"
            )

    def matches(self, digest: str) -> bool:
        return digest.lower() == self.hexdigest

    def __str__(self) -> str:
        return f"{self.algorithm.upper()} {self.hexdigest}"


def file_digest(path, algorithm: str = "sha1", chunk_size: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def move_aside(path) -> Path:
    """Rename `path` to `<path>.bad` (or `.bad1`, `.bad2`, ... if taken) and return the new path."""
    path = Path(path)
    target = path.with_name(path.name + ".bad")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.bad{n}")
    os.replace(path, target)
    return target


def verify_checksum(path, checksum: Checksum | None, *, quarantine: bool = True, display_name=None) -> None:
    """Raise ChecksumError if `path` does not match `checksum` (no-op when None).

    With `quarantine`, a mismatching file is first moved aside so nothing trusts it later.
    """
    if checksum is None:
        return
    path = Path(path)
    digest = file_digest(path, checksum.algorithm)
    if checksum.matches(digest):
        return
    name = display_name or path.name
    msg = f"{checksum.algorithm.upper()} of {name} is {digest}, expected {checksum}"
    if quarantine:
        msg += f"; the file was moved aside to {move_aside(path)}"
    raise ChecksumError(msg)


def _total_from_content_range(value: str | None) -> int | None:
    # "bytes 100-199/1000" or "bytes */1000"
    m = re.fullmatch(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", (value or "").strip())
    return int(m.group(1)) if m else None


def _start_from_content_range(value: str | None) -> int | None:
    m = re.fullmatch(r"bytes\s+(\d+)-\d+/(?:\d+|\*)", (value or "").strip())
    return int(m.group(1)) if m else None


def _open(opener, request, timeout):
    return (opener or urllib.request.build_opener()).open(request, timeout=timeout)


def download(
    url: str,
    path,
    *,
    checksum: Checksum | None = None,
    opener: urllib.request.OpenerDirector | None = None,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
    reject_html: bool = False,
    progress: bool = True,
) -> Path:
    """Download `url` to `path` and return `path`.

    - An existing `path` that matches `checksum` (or any existing `path` when no
      checksum is known) is returned as is; a mismatching one is moved aside.
    - Bytes go to `<path>.part`; an existing `.part` is resumed with a Range request
      (a server that ignores Range restarts the file from zero).
    - An interrupted transfer keeps `.part` and raises DownloadError; run again to resume.
    - `reject_html`: fail if the server answers with an HTML page (a login page instead
      of the archive), before anything is written.
    """
    path = Path(path)
    if path.is_file():
        if checksum is None:
            return path
        try:
            verify_checksum(path, checksum)
            return path
        except ChecksumError as e:
            print(f"warning: {e}; downloading it again")
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")

    for _attempt in range(2):  # a second attempt only after discarding an unusable .part
        offset = part.stat().st_size if part.is_file() else 0
        headers = {"User-Agent": _USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            resp = _open(opener, urllib.request.Request(url, headers=headers), timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:
                total = _total_from_content_range(e.headers.get("Content-Range"))
                e.close()
                if total == offset:  # the .part already holds the whole file
                    break
                part.unlink()
                continue
            e.close()
            raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise DownloadError(f"cannot reach {url} ({reason})") from None

        with resp:
            if reject_html and resp.headers.get_content_type() == "text/html":
                raise DownloadError(
                    f"{url} answered with an HTML page instead of {path.name} "
                    "(not logged in, wrong credentials, or no access to this package)"
                )
            _stream(resp, part, offset, url, chunk_size=chunk_size, progress=progress)
        break
    else:
        raise DownloadError(f"cannot resume {url} into {part}; delete it and run again")

    verify_checksum(part, checksum, display_name=f"the download of {url}")
    os.replace(part, path)
    return path


def _stream(resp, part: Path, offset: int, url: str, *, chunk_size: int, progress: bool) -> None:
    """Writes the response body to `part`, appended when the server resumed at `offset`."""
    status = getattr(resp, "status", 200)
    if offset and status == 206 and _start_from_content_range(resp.headers.get("Content-Range")) == offset:
        mode = "ab"
    else:  # no resume: the server ignored Range (200) or answered an unexpected range
        mode, offset = "wb", 0
    length = resp.headers.get("Content-Length")
    total = offset + int(length) if length is not None and length.isdigit() else None
    written = offset
    try:
        with open(part, mode) as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name.removesuffix(".part"), disable=not progress, leave=False,
        ) as bar:
            while chunk := resp.read(chunk_size):
                f.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    except (OSError, HTTPException, socket.timeout) as e:
        raise DownloadError(
            f"download of {url} was interrupted after {written} bytes ({e}); run again to resume from {part}"
        ) from None
    if total is not None and written != total:
        raise DownloadError(f"download of {url} stopped at {written} of {total} bytes; run again to resume from {part}")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the 3xx reaches the caller as an HTTPError


def cityscapes_login(username: str, password: str, *, base_url: str = CITYSCAPES_URL, timeout: float = 60.0):
    """Log in to the Cityscapes website and return an opener holding the session cookie.

    Same exchange as the official `csDownload` tool: GET the login page (session
    cookie), POST the form, and a 302 redirect means success. Cookies stay in memory.
    """
    jar = http.cookiejar.CookieJar()
    cookies = urllib.request.HTTPCookieProcessor(jar)
    login_opener = urllib.request.build_opener(cookies, _NoRedirect())
    login_url = f"{base_url}/login"
    headers = {"User-Agent": _USER_AGENT}
    form = urllib.parse.urlencode({"username": username, "password": password, "submit": "Login"}).encode()

    def status_of(request):
        try:
            with login_opener.open(request, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            e.close()
            return e.code
        except (urllib.error.URLError, OSError, HTTPException) as e:
            raise DownloadError(f"cannot reach {login_url} ({getattr(e, 'reason', e)})") from None

    status_of(urllib.request.Request(login_url, headers=headers))
    status = status_of(urllib.request.Request(login_url, data=form, headers=headers))
    if status != 302:
        raise DownloadError(
            f"Cityscapes login failed for user {username!r} (HTTP {status}): check --username/--password "
            f"(register at {base_url}/register/)"
        )
    return urllib.request.build_opener(cookies)
