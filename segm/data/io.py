"""Reading images and labels with clear errors (no mmcv/mmseg import).

`read_image` is the one image reader: training and evaluation (through the mmseg pipeline's
loader), the policy network and inference all call it, and `pil_to_rgb` applies the same
rule to an image already opened with PIL. `read_label` reads as mmseg's `LoadAnnotations`
(pillow, `reduce_zero_label`). Every check names the file.

The rule, for every image:

- **Decoding** is OpenCV's (mmcv's cv2 backend) with the stored pixel order: EXIF orientation
  is ignored, because label PNGs carry none and must match the image pixel for pixel.
- **Channels**: grey is repeated into three channels, alpha is dropped (not composited),
  palette images are expanded.
- **Depth** becomes 8 bits: 8-bit values are kept as stored (bit for bit what OpenCV's
  `IMREAD_COLOR` gives); an unsigned b-bit integer keeps its high byte, v >> (b − 8) (16-bit:
  v >> 8, as libpng and OpenCV reduce 16-bit PNGs); a signed one is read the same way over
  its non-negative range (int32: v >> 23) and may not be negative; floating-point values are
  intensities in [0, 1], scaled by 255 and rounded; values outside, or NaN, are refused.
- **Size**: an image or label of more than `pixel_limit()` pixels (default `DEFAULT_MAX_PIXELS`,
  PIL's own threshold; `$SEGM_MAX_PIXELS` or a command's `--max-pixels` raise it) is refused
  from its header, before it is decoded: a small compressed file can claim a huge canvas.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import warnings

import numpy as np

from .base import IGNORE_LABEL

# PIL modes holding more than 8 bits per sample (read through the depth rule).
_PIL_DEEP_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
# The pixel limit of every decoded image: PIL's own warning threshold (≈ 89.5 M pixels, 268 MB as
# RGB); $SEGM_MAX_PIXELS or an explicit `max_pixels` raise it.
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3
MAX_PIXELS_ENV = "SEGM_MAX_PIXELS"
_PIL_GUARD_LOCK = threading.Lock()
_QUIET_LOCK = threading.Lock()
_QUIET = {"readers": 0, "level": None}  # decoders running with OpenCV's log silenced, and the level before
_RAISE_LIMIT = f"raise it with --max-pixels N or ${MAX_PIXELS_ENV}=N if the image is meant to be this large"
# How torch's DataLoader re-raises an exception from a worker process or thread.
_WORKER_ERROR = re.compile(r"Caught (\w+) (in .*?)\.\nOriginal Traceback")


class DataError(ValueError):
    """A data file is missing, unreadable or holds invalid values."""


def user_message(exc: BaseException) -> str:
    """The message of a user error, also when a DataLoader worker raised it: torch re-raises it
    as "Caught X in DataLoader worker process N.", then the worker's traceback, whose exception
    line is the original "module.X: message"."""
    text = str(exc)
    if not _WORKER_ERROR.match(text):
        return text if text.strip() else type(exc).__name__
    lines = text.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    head = re.compile(rf"(?:[\w.]+\.)?{re.escape(type(exc).__name__)}: ")
    for i in range(frames[-1] + 1 if frames else 0, len(lines)):
        found = head.match(lines[i])
        if found:
            return "\n".join([lines[i][found.end():], *lines[i + 1:]]).strip()
    return lines[-1]


def _read_bytes(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e.strerror or e}") from None


def pixel_limit(limit: int | None = None) -> int:
    """The pixel limit: `limit` when given, else `$SEGM_MAX_PIXELS`, else DEFAULT_MAX_PIXELS."""
    if limit is None:
        env = os.environ.get(MAX_PIXELS_ENV)
        try:
            limit = DEFAULT_MAX_PIXELS if env is None else int(env)
        except ValueError:
            raise ValueError(f"${MAX_PIXELS_ENV} must be a number of pixels, got {env!r}") from None
    if limit < 1:
        raise ValueError(f"the pixel limit (--max-pixels, ${MAX_PIXELS_ENV}) must be ≥ 1, got {limit}")
    return int(limit)


def check_pixels(width: int, height: int, what: str, limit: int | None = None) -> None:
    """Refuses an image of more than `pixel_limit(limit)` pixels, naming it and the way to raise the limit."""
    limit = pixel_limit(limit)
    if width * height > limit:
        raise DataError(f"{what} is {width}×{height} = {width * height} pixels, more than the limit of {limit}: "
                        + _RAISE_LIMIT)


def _open_header(data: bytes, what: str, limit: int):
    """The PIL image of `data`, its header read and nothing decoded; None when PIL does not know
    the format. PIL's own size guard is replaced by `check_pixels`."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:  # more than twice PIL's limit, as the header says
            found = re.search(r"\((\d+) pixels\)", str(e))
            pixels = int(found.group(1)) if found else 2 * Image.MAX_IMAGE_PIXELS + 1
            if pixels > limit:
                raise DataError(f"{what} has {pixels} pixels, more than the limit of {limit}: {_RAISE_LIMIT}") from None
            with _PIL_GUARD_LOCK:  # within a raised limit: PIL's guard steps aside for this file
                guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    return Image.open(io.BytesIO(data))
                finally:
                    Image.MAX_IMAGE_PIXELS = guard
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            return None


@contextlib.contextmanager
def _quiet_opencv():
    """OpenCV logs a failed first attempt (e.g. a 32-bit TIFF read in colour) on stderr although
    the second one reads the file; the outcome is reported here, not there. OpenCV's log level
    is process-wide: the first of concurrent readers silences it, the last restores it."""
    import cv2

    logging = cv2.utils.logging
    with _QUIET_LOCK:
        if not _QUIET["readers"]:
            _QUIET["level"] = logging.getLogLevel()
            logging.setLogLevel(logging.LOG_LEVEL_SILENT)
        _QUIET["readers"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET["readers"] -= 1
            if not _QUIET["readers"]:
                logging.setLogLevel(_QUIET["level"])


def _decode(buf: np.ndarray):
    """OpenCV's decoding, stored pixel order: BGR(A) or grey, at the file's depth (None if it fails)."""
    import cv2

    if not buf.size:
        return None
    with _quiet_opencv():
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION)
        if img is None:  # e.g. single-channel 32-bit TIFFs, which OpenCV decodes only unchanged
            img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return img


def read_image(path, *, channel_order: str = "rgb", max_pixels: int | None = None) -> np.ndarray:
    """uint8 (H, W, 3) in `channel_order` ("rgb", or "bgr" as mmcv's pipelines take it), by the
    module docstring's rule: EXIF orientation is ignored (the stored pixel order, which labels
    share), grey is repeated, alpha dropped, 16-bit values reduced to their high byte, floats
    taken as [0, 1]. More than `max_pixels` pixels (`check_pixels`) are refused undecoded."""
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    data, what = _read_bytes(path, "image"), f"image {path}"
    limit = pixel_limit(max_pixels)
    header = _open_header(data, what, limit)
    if header is not None:
        with header:
            check_pixels(*header.size, what, limit)
    img = _decode(np.frombuffer(data, np.uint8))
    if img is None:
        raise DataError(f"cannot decode image {path}: the file is corrupt or not an image")
    if header is None:  # a format PIL cannot read: checked once decoded
        check_pixels(img.shape[1], img.shape[0], what, limit)
    img = _to_uint8_3ch(img, f"image {path}")  # BGR order kept
    return np.ascontiguousarray(img[:, :, ::-1]) if channel_order == "rgb" else img


def pil_to_rgb(image, *, max_pixels: int | None = None) -> np.ndarray:
    """uint8 (H, W, 3) RGB of a PIL image, by `read_image`'s rule (8-bit modes through PIL's own
    `convert("RGB")`, as before; 16- and 32-bit modes through the depth rule). An image opened
    but not yet loaded is checked against the pixel limit before it is decoded."""
    check_pixels(*image.size, f"the {image.width}×{image.height} image", max_pixels)
    if image.mode in _PIL_DEEP_MODES:
        return _to_uint8_3ch(np.asarray(image), f"the {image.mode} image")
    return np.asarray(image.convert("RGB"))


def _to_uint8_3ch(img: np.ndarray, what: str) -> np.ndarray:
    """(H, W[, C]) of any depth -> uint8 (H, W, 3) by the module's channel and depth rule; the
    channel order is kept. `what` names the source in errors."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4):
        raise DataError(f"{what} has shape {img.shape}: expected grey, grey + alpha, 3 or 4 channels")
    if img.shape[2] in (2, 4):  # alpha dropped
        img = img[:, :, : img.shape[2] - 1]
    img = _to_uint8(img, what)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def _to_uint8(img: np.ndarray, what: str) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    kind, bits = img.dtype.kind, img.dtype.itemsize * 8
    if kind == "b":
        return img.astype(np.uint8) * 255
    if kind == "f":
        bad = ~((img >= 0) & (img <= 1))  # NaN included
        if bad.any():
            raise DataError(f"{what} holds floating-point values outside [0, 1] (e.g. {img[bad].flat[0]}): "
                            "floating-point images must hold intensities in [0, 1]; save it as 8 or 16 bits")
        return np.rint(img.astype(np.float64) * 255).astype(np.uint8)
    if kind not in "iu":
        raise DataError(f"{what} has unsupported pixel type {img.dtype}")
    if kind == "i":
        if (img < 0).any():
            raise DataError(f"{what} holds negative values (min {img.min()}): integer images must not be negative")
        bits -= 1  # the sign bit
    if bits <= 8:
        return img.astype(np.uint8) << (8 - bits)
    return (img >> (bits - 8)).astype(np.uint8)


def check_same_size(image_path, image_shape, label_path, label_shape) -> None:
    """An image and its label must have the same stored size (the one check, wherever pairs are read)."""
    (ih, iw), (lh, lw) = tuple(image_shape)[:2], tuple(label_shape)[:2]
    if (ih, iw) != (lh, lw):
        raise DataError(
            f"label {label_path} is {lw}x{lh} but its image {image_path} is {iw}x{ih}: an image and its label "
            "must have the same stored size (EXIF orientation is ignored; rotate the pixels, not the tag)"
        )


def read_label(path: str, n_cls: int, *, reduce_zero_label: bool, ignore_value: int = IGNORE_LABEL,
               max_pixels: int | None = None) -> np.ndarray:
    """uint8 (H, W) label in train label space (ignore = 255), as mmseg `LoadAnnotations`.

    ignore_value: the file's ignore value (ADE20K: 0 via reduce_zero_label), mapped to 255.
    reduce_zero_label: 0 -> 255, others -1 (ADE20K). More than `max_pixels` pixels are refused undecoded.
    """
    from PIL import UnidentifiedImageError

    data, what = _read_bytes(path, "label"), f"label {path}"
    limit = pixel_limit(max_pixels)
    header = _open_header(data, what, limit)
    if header is None:
        raise DataError(f"cannot decode label {path}: the file is corrupt or not an image")
    check_pixels(*header.size, what, limit)
    try:
        with header as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise DataError(
                    f"label {path} has image mode {im.mode}: labels must be single-channel PNGs "
                    "(mode L or P) holding one class index per pixel"
                )
            seg = np.array(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot decode label {path}: the file is corrupt or not an image ({e})") from None
    seg = seg.astype(np.int64, copy=False)
    if ignore_value != IGNORE_LABEL and not reduce_zero_label:
        seg = np.where(seg == ignore_value, IGNORE_LABEL, seg)
    hi = n_cls + 1 if reduce_zero_label else n_cls  # valid file values are [0, hi) plus 255
    bad = (seg >= hi) & (seg != IGNORE_LABEL) | (seg < 0)
    if bad.any():
        values = np.unique(seg[bad])[:8].tolist()
        allowed = f"0..{hi - 1}" + (" (0 = ignore)" if reduce_zero_label else f" or {IGNORE_LABEL} (ignore)")
        raise DataError(
            f"label {path} holds values {values} outside the {n_cls} classes: expected {allowed}"
        )
    seg = seg.astype(np.uint8)
    if reduce_zero_label:  # same ops as mmseg LoadAnnotations
        seg[seg == 0] = 255
        seg = seg - 1
        seg[seg == 254] = 255
    return seg
