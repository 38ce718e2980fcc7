"""The synthetic dataset's `textured` style: classes told apart by texture alone, colours
drawn per region from one palette that every class shares (`prepare_synthetic --style
textured`), and the smooth noise both styles use."""
from __future__ import annotations

import cv2
import numpy as np

# textured style: the palette all classes share and the range of a region's contrast (grey
# levels per unit pattern). The hues are squeezed to 35 % of their spread around mid-grey
# (channels within 111..147) and the contrast is 40..60: with the full spread and a contrast of
# 16..30, a ViT-Ti trained from scratch with the demo's recipe (600 SGD iterations) never left
# the class prior (loss 2.0, mIoU 2.4), so no comparison on it meant anything.
_HUES = np.array([
    (180, 90, 80), (90, 150, 90), (80, 110, 175), (175, 160, 85),
    (130, 130, 130), (150, 95, 160), (85, 160, 165), (170, 130, 100),
], np.float32)
SHARED_PALETTE = (128 + (_HUES - 128) * 0.35).astype(np.float32)
CONTRAST = (40.0, 60.0)


def lowfreq(rng, h, w, cells):
    """Smooth noise, about unit variance, `cells` bumps across the long side."""
    gh = max(2, round(cells * h / max(h, w)))
    gw = max(2, round(cells * w / max(h, w)))
    return cv2.resize(rng.standard_normal((gh, gw)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)


# ----------------------------------------------------------------------------- textured style
# Each pattern function returns a float32 (h, w) luminance pattern over the whole canvas;
# `_pattern` makes it zero-mean, unit-variance. Periods are in pixels at size 256 (scaled by s,
# at least 3 px), jittered ±15 % per image with a random phase.
def _period(rng, p, s):
    return max(3.0, p * s * rng.uniform(0.85, 1.15))


def _stripes(rng, yy, xx, s, angle, period=10):
    """Sine stripes running at `angle` degrees (0: horizontal stripes, 90: vertical)."""
    a = np.deg2rad(angle + rng.uniform(-4, 4))
    across = -xx * np.sin(a) + yy * np.cos(a)
    return np.sin(2 * np.pi * across / _period(rng, period, s) + rng.uniform(0, 2 * np.pi))


def _smooth(rng, yy, xx, s):
    """Sky: broad shading, a few bumps across the image."""
    h, w = yy.shape
    return lowfreq(rng, h, w, 3)


def _grain(rng, yy, xx, s, blob=1.0):
    """Grass (blob 1 px: white grain) and tree (blob ~7 px: coarse mottling)."""
    h, w = yy.shape
    if blob <= 1:
        return rng.standard_normal((h, w)).astype(np.float32)
    return lowfreq(rng, h, w, max(h, w) / _period(rng, blob, s))


def _dots(rng, yy, xx, s, period=9):
    """Ball: a square grid of round dots, radius 0.3 period."""
    p = _period(rng, period, s)
    dy, dx = (yy + rng.uniform(0, p)) % p - p / 2, (xx + rng.uniform(0, p)) % p - p / 2
    return (dy * dy + dx * dx < (0.3 * p) ** 2).astype(np.float32)


def _checker(rng, yy, xx, s, cell=5):
    """Box: a checkerboard."""
    k = _period(rng, cell, s)
    return ((np.floor((yy + rng.uniform(0, k)) / k) + np.floor((xx + rng.uniform(0, k)) / k)) % 2).astype(np.float32)


def _grid(rng, yy, xx, s, period=9):
    """Sign: thin grid lines (tiles), 2 px wide at size 256."""
    p, width = _period(rng, period, s), max(1.0, 2 * s)
    on_y, on_x = (yy + rng.uniform(0, p)) % p < width, (xx + rng.uniform(0, p)) % p < width
    return (on_y | on_x).astype(np.float32)


PATTERNS = {
    "sky": _smooth,
    "wall": lambda rng, yy, xx, s: _stripes(rng, yy, xx, s, 0),
    "floor": lambda rng, yy, xx, s: _stripes(rng, yy, xx, s, 90),
    "road": lambda rng, yy, xx, s: _stripes(rng, yy, xx, s, 45),
    "water": lambda rng, yy, xx, s: _stripes(rng, yy, xx, s, 135),
    "grass": _grain,
    "tree": lambda rng, yy, xx, s: _grain(rng, yy, xx, s, blob=7),
    "ball": _dots,
    "box": _checker,
    "sign": _grid,
}


def _pattern(c, rng, yy, xx, s):
    v = PATTERNS[c](rng, yy, xx, s).astype(np.float32)
    return (v - v.mean()) / max(float(v.std()), 1e-6)


def _regions(cls_map):
    """(int32 map of connected regions numbered from 0, number of regions)."""
    regions, n = np.zeros(cls_map.shape, np.int32), 0
    for c in np.unique(cls_map):
        k, comp = cv2.connectedComponents((cls_map == c).astype(np.uint8), connectivity=4)
        m = comp > 0
        regions[m] = comp[m] + n - 1
        n += k - 1
    return regions, n


def render_textured(rng, cls_map, s, names):
    """Float (h, w, 3): region colour (shared palette) + region contrast · class pattern;
    `names[c]` is class c's name."""
    h, w = cls_map.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pattern = np.zeros((h, w), np.float32)
    for c in np.unique(cls_map):
        m = cls_map == c
        pattern[m] = _pattern(names[int(c)], rng, yy, xx, s)[m]
    regions, n = _regions(cls_map)
    colour = SHARED_PALETTE[rng.integers(len(SHARED_PALETTE), size=n)] + rng.normal(0, 6, (n, 3)).astype(np.float32)
    contrast = rng.uniform(*CONTRAST, n).astype(np.float32)
    return colour[regions] + (contrast[regions] * pattern)[..., None]
