"""Reading images and labels with clear errors (no mmcv/mmseg import).

`read_image` decodes as mmcv's cv2 backend does and `read_label` as mmseg's
`LoadAnnotations` (pillow, `reduce_zero_label`), plus checks that name the file.
"""
from __future__ import annotations

import io

import numpy as np

from .base import IGNORE_LABEL


class DataError(ValueError):
    """A data file is missing, unreadable or holds invalid values."""


def _read_bytes(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e.strerror or e}") from None


def read_image(path: str) -> np.ndarray:
    """BGR uint8 (H, W, 3), as mmcv's cv2 backend; grey and RGBA files become 3 channels."""
    import cv2

    buf = np.frombuffer(_read_bytes(path, "image"), np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise DataError(f"cannot decode image {path}: the file is corrupt or not an image")
    return img


def read_label(path: str, n_cls: int, *, reduce_zero_label: bool, ignore_value: int = IGNORE_LABEL) -> np.ndarray:
    """uint8 (H, W) label in train label space (ignore = 255), as mmseg `LoadAnnotations`.

    ignore_value: the file's ignore value (ADE20K: 0 via reduce_zero_label), mapped to 255.
    reduce_zero_label: 0 -> 255, others -1 (ADE20K).
    """
    from PIL import Image, UnidentifiedImageError

    data = _read_bytes(path, "label")
    try:
        with Image.open(io.BytesIO(data)) as im:
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
