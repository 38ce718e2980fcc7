"""Generate a small synthetic segmentation dataset that looks like scene parsing.

    python -m segm.scripts.prepare_synthetic $DATASET [--num-train 400 --num-val 100
        --size 256 --seed 0 --style plain --workers 2 --overwrite]

writes `$DATASET/synthetic/`:

    images/{training,validation}/syn_<split>_<i>.jpg      RGB, height = size, width = size·{1, 1.25, 1.5}
    annotations/{training,validation}/syn_<split>_<i>.png  palette PNG, values 0..9 and 255
    classes.yml                                           names, palette, ignore_index 255,
                                                          reduce_zero_label false, generator args
                                                          (`style` recorded when not plain)

Scenes are outdoor (sky over grass/road/water, buildings, trees) or indoor (wall over floor,
windows): large smooth regions with gradients and low-frequency texture, plus small objects
(balls, boxes, signs, bushes) drawn as ellipses, rotated rectangles and polygons. Each class
has its own colour and texture. 255 (ignore) appears only as the 1-px outline of about a
third of the small objects, like the void borders of Pascal VOC.

Two styles draw the same scenes (the same label maps for a seed):

- `plain` (default): each class has its own colour and texture, so colour alone tells the
  classes apart.
- `textured`: each connected region takes a colour from one palette shared by all classes
  (neighbouring regions may share it) and a contrast, both drawn independently of its class;
  the class shows only in its texture (luminance pattern): smooth shading (sky), stripes by
  orientation (wall horizontal, floor vertical, road `/`, water `\`), grain by scale (grass fine,
  tree coarse blobs) and periodic patterns (ball dots, box checker, sign grid lines). A region's
  mean colour says nothing about its class.

Deterministic: image i of a split depends only on (seed, split, i). The dataset is written to
a temporary folder and renamed into place; running again with the same arguments does nothing.
"""
from __future__ import annotations

import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click
import cv2
import numpy as np
from PIL import Image

from segm.config import dump_yaml, load_yaml
from segm.data.names import DATASET_SPLITS, FOLDER_SPLITS, IMAGE_DIR, LABEL_DIR, ROOT_DIRS
from segm.scripts._prepare_common import cli_errors
from segm.scripts.synthetic_textured import lowfreq, render_textured
from segm.utils.cli import CONTEXT_SETTINGS
from segm.utils.writable import check_writable

GENERATOR_VERSION = 1
IGNORE = 255
BLOCK = 32
CLASSES = (
    ("sky", (135, 190, 235)),
    ("wall", (205, 185, 150)),
    ("floor", (125, 80, 45)),
    ("grass", (75, 160, 55)),
    ("road", (85, 85, 92)),
    ("water", (30, 80, 170)),
    ("tree", (25, 80, 35)),
    ("ball", (215, 40, 40)),
    ("box", (235, 200, 40)),
    ("sign", (190, 50, 200)),
)
SKY, WALL, FLOOR, GRASS, ROAD, WATER, TREE, BALL, BOX, SIGN = range(len(CLASSES))
CLASS_NAMES = tuple(name for name, _ in CLASSES)
STYLES = ("plain", "textured")
SPLITS = tuple((FOLDER_SPLITS[split], split) for split in DATASET_SPLITS["synthetic"])  # (folder, name prefix)


# ----------------------------------------------------------------------------- textures
def _texture(c, rng, h, w, s):
    """Float (h, w, 3) RGB image of class c over the whole canvas; s = size / 256."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.array(CLASSES[c][1], np.float32) + rng.normal(0, 7, 3).astype(np.float32)
    noise = rng.standard_normal((h, w)).astype(np.float32)
    if c == SKY:  # brighter towards the horizon
        v = (yy / h)[..., None] * np.array([70, 40, 15], np.float32) + 5 * lowfreq(rng, h, w, 3)[..., None]
    elif c == WALL:
        v = (14 * lowfreq(rng, h, w, 5) + 3 * noise)[..., None]
    elif c == FLOOR:  # planks
        period = rng.uniform(7, 12) * s
        v = (16 * np.sin(2 * np.pi * (yy + 3 * s * lowfreq(rng, h, w, 6)) / period) + 5 * noise)[..., None]
    elif c == GRASS:
        v = (22 * noise)[..., None] * np.array([0.6, 1.0, 0.5], np.float32)
    elif c == ROAD:
        v = (7 * noise + 6 * lowfreq(rng, h, w, 8))[..., None]
    elif c == WATER:
        p, q = rng.uniform(6, 10) * s, rng.uniform(20, 40) * s
        wave = np.sin(2 * np.pi * (yy / p + 0.25 * np.sin(2 * np.pi * xx / q)))
        v = (22 * wave)[..., None] * np.array([0.3, 0.6, 1.0], np.float32)
    elif c == TREE:
        v = (20 * lowfreq(rng, h, w, 24) + 10 * noise)[..., None]
    elif c == BALL:
        v = (6 * noise)[..., None]
    elif c == BOX:  # checker
        k = max(2, round(6 * s))
        v = (28 * (((yy // k + xx // k) % 2) * 2 - 1) + 4 * noise)[..., None]
    else:  # SIGN: diagonal stripes
        period = rng.uniform(6, 10) * s
        v = (26 * np.sign(np.sin(2 * np.pi * (xx + yy) / period)) + 4 * noise)[..., None]
    return base + v


def _render_plain(rng, cls_map, s):
    h, w = cls_map.shape
    img = np.zeros((h, w, 3), np.float32)
    for c in np.unique(cls_map):
        m = cls_map == c
        img[m] = _texture(int(c), rng, h, w, s)[m]
    return img


RENDER = {"plain": _render_plain, "textured": lambda rng, cls_map, s: render_textured(rng, cls_map, s, CLASS_NAMES)}


# ----------------------------------------------------------------------------- shapes
def _fill(maps, c, draw):
    """Draw the same filled shape with value c on the class map and the label map."""
    for m in maps:
        draw(m, c)


def _small_object(rng, cls_map, lab, s, h, w):
    c = int(rng.choice([BALL, BOX, SIGN, TREE], p=[0.3, 0.3, 0.25, 0.15]))
    r = rng.uniform(6, 24) * s
    cx, cy = rng.uniform(0, w), h * rng.uniform(0.3, 0.98)
    outline = rng.random() < 0.35
    if c in (BALL, TREE):
        axes = (max(2, int(r)), max(2, int(r * rng.uniform(0.65, 1.0))))
        angle = float(rng.uniform(0, 180))
        center = (int(cx), int(cy))
        _fill((cls_map, lab), c, lambda m, v: cv2.ellipse(m, center, axes, angle, 0, 360, v, -1))
        if outline:
            cv2.ellipse(lab, center, axes, angle, 0, 360, IGNORE, 1)
        return
    if c == BOX:
        wh = (2 * r * rng.uniform(0.6, 1.0), 2 * r * rng.uniform(0.6, 1.0))
        pts = cv2.boxPoints(((cx, cy), wh, float(rng.uniform(0, 90))))
    else:
        n = int(rng.integers(3, 7))
        t = rng.uniform(0, 2 * np.pi) + np.arange(n) * 2 * np.pi / n
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
    pts = [np.round(pts).astype(np.int32)]
    _fill((cls_map, lab), c, lambda m, v: cv2.fillPoly(m, pts, v))
    if outline:
        cv2.polylines(lab, pts, True, IGNORE, 1)


def _tree_clump(rng, cls_map, lab, s, x, y):
    for _ in range(int(rng.integers(2, 5))):
        center = (int(x + rng.normal(0, 10 * s)), int(y - rng.uniform(0, 25 * s)))
        axes = (int(rng.uniform(10, 26) * s), int(rng.uniform(12, 30) * s))
        _fill((cls_map, lab), TREE, lambda m, v: cv2.ellipse(m, center, axes, 0, 0, 360, v, -1))


def _scene(rng, h, w, s):
    """Class map (what is rendered) and label map (class map + ignore outlines), uint8."""
    yy, xx = np.mgrid[0:h, 0:w]
    cls_map = np.empty((h, w), np.uint8)
    if rng.random() < 0.6:  # outdoor
        y0 = h * rng.uniform(0.3, 0.55)
        horizon = y0 + h * rng.uniform(0, 0.04) * np.sin(2 * np.pi * xx / (w * rng.uniform(0.5, 1.5)) + rng.uniform(0, 6.3))
        horizon = horizon + rng.uniform(-0.15, 0.15) * (xx - w / 2)
        ground = int(rng.choice([GRASS, ROAD, WATER]))
        cls_map[:] = SKY
        cls_map[yy > horizon] = ground
        if rng.random() < 0.6:  # a second ground region beyond a slanted line
            other = int(rng.choice([g for g in (GRASS, ROAD, WATER) if g != ground]))
            x1, slope = rng.uniform(0.2, 0.8) * w, rng.uniform(-3, 3)
            side = (xx - x1) * slope - (yy - y0) > 0 if rng.random() < 0.5 else (xx - x1) * slope - (yy - y0) < 0
            cls_map[(yy > horizon) & side] = other
        lab = cls_map.copy()
        if rng.random() < 0.5:  # building
            bw, bh = w * rng.uniform(0.15, 0.45), h * rng.uniform(0.15, 0.35)
            x0 = rng.uniform(0, w - bw)
            top = int(y0 - bh)
            cls_map[max(top, 0):int(y0 + 4 * s), int(x0):int(x0 + bw)] = WALL
            lab[max(top, 0):int(y0 + 4 * s), int(x0):int(x0 + bw)] = WALL
        for _ in range(int(rng.integers(0, 4))):
            _tree_clump(rng, cls_map, lab, s, rng.uniform(0, w), y0)
    else:  # indoor
        y0 = h * rng.uniform(0.45, 0.7) + rng.uniform(-0.08, 0.08) * (xx - w / 2)
        cls_map[:] = WALL
        cls_map[yy > y0] = FLOOR
        lab = cls_map.copy()
        for _ in range(int(rng.integers(0, 3))):  # windows showing the sky
            ww, wh = w * rng.uniform(0.1, 0.25), h * rng.uniform(0.12, 0.25)
            x0, top = rng.uniform(0, w - ww), h * rng.uniform(0.05, 0.2)
            cls_map[int(top):int(top + wh), int(x0):int(x0 + ww)] = SKY
            lab[int(top):int(top + wh), int(x0):int(x0 + ww)] = SKY
    n_objects = int(rng.integers(2, 9) * (w / h))
    for _ in range(n_objects):
        _small_object(rng, cls_map, lab, s, h, w)
    return cls_map, lab


def check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"--style must be one of {', '.join(STYLES)}, got {style!r}")


def make_sample(seed: int, split_index: int, index: int, size: int, style: str = "plain"):
    """(RGB uint8 image (H, W, 3), uint8 label (H, W)) of one sample; the label map does not
    depend on the style."""
    check_style(style)
    rng = np.random.default_rng([seed, split_index, index])
    h = size
    w = int(round(size * float(rng.choice([1.0, 1.0, 1.25, 1.5]))))
    s = size / 256
    cls_map, lab = _scene(rng, h, w, s)
    img = RENDER[style](rng, cls_map, s)
    img = cv2.GaussianBlur(img, (3, 3), 0.7)
    img += 3 * rng.standard_normal((h, w, 1)).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), lab


def block_counts(lab: np.ndarray) -> tuple[int, int]:
    """(single-class 32×32 blocks, all full blocks) of a label map."""
    h, w = (lab.shape[0] // BLOCK) * BLOCK, (lab.shape[1] // BLOCK) * BLOCK
    b = lab[:h, :w].reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK)
    return int((b.max((1, 3)) == b.min((1, 3))).sum()), b.shape[0] * b.shape[2]


# ----------------------------------------------------------------------------- writing
def _palette_bytes():
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(CLASSES)] = [c for _, c in CLASSES]
    pal[IGNORE] = 255
    return pal.ravel().tolist()


def _write_one(args):
    out_dir, seed, split_index, folder, prefix, index, size, style = args
    img, lab = make_sample(seed, split_index, index, size, style)
    name = f"syn_{prefix}_{index:05d}"
    Image.fromarray(img).save(out_dir / IMAGE_DIR / folder / f"{name}.jpg", quality=92)
    png = Image.fromarray(lab, mode="L").convert("P")
    png.putpalette(_palette_bytes())
    png.save(out_dir / LABEL_DIR / folder / f"{name}.png")
    return block_counts(lab)


def generator_args(num_train, num_val, size, seed, style="plain") -> dict:
    """What classes.yml records; `style` only when not plain, so that a plain dataset's files
    (and an existing plain dataset's rerun check) stay what they were before styles existed."""
    args = dict(version=GENERATOR_VERSION, num_train=num_train, num_val=num_val, size=size, seed=seed)
    return args if style == "plain" else {**args, "style": style}


def classes_yaml(args: dict) -> dict:
    return {
        "names": [n for n, _ in CLASSES],
        "palette": [list(c) for _, c in CLASSES],
        "ignore_index": IGNORE,
        "reduce_zero_label": False,
        "generator": args,
    }


def _existing_args(target: Path):
    try:
        return load_yaml(target / "classes.yml").get("generator")
    except (FileNotFoundError, ValueError, AttributeError):
        return None


def _fmt_args(args: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in args.items() if k != "version")


def generate_synthetic(dataset_root, *, num_train=400, num_val=100, size=256, seed=0, style="plain",
                       overwrite=False, workers=1, log=print) -> dict:
    """Write `<dataset_root>/synthetic` (see the module docstring); returns a summary dict
    with `path`, `created` (False when it already existed with these arguments) and
    `single_class_fraction` (of all 32×32 blocks, None when it was not created)."""
    if num_train < 1 or num_val < 1:
        raise ValueError("--num-train and --num-val must be at least 1")
    if size < BLOCK or size % 8:
        raise ValueError(f"--size must be a multiple of 8 and at least {BLOCK}, got {size}")
    check_style(style)
    root = Path(dataset_root)
    target = root / ROOT_DIRS["synthetic"]
    args = generator_args(num_train, num_val, size, seed, style)
    if target.exists():
        found = _existing_args(target)
        if found == args:
            log(f"{target} already exists with these arguments: nothing to do")
            return dict(path=target, created=False, single_class_fraction=None)
        if not overwrite:
            what = (f"other arguments ({_fmt_args(found)}; asked {_fmt_args(args)})"
                    if isinstance(found, dict) else "unknown content")
            raise FileExistsError(f"{target} already exists with {what}: pass --overwrite to replace it")
    check_writable(root, "DATASET_ROOT")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".synthetic.tmp-{os.getpid()}"
    old = root / f".synthetic.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for folder, _ in SPLITS:
            (tmp / IMAGE_DIR / folder).mkdir(parents=True)
            (tmp / LABEL_DIR / folder).mkdir(parents=True)
        jobs = [
            (tmp, seed, k, folder, prefix, i, size, style)
            for k, (folder, prefix) in enumerate(SPLITS)
            for i in range(num_train if prefix == "train" else num_val)
        ]
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                counts = list(pool.map(_write_one, jobs, chunksize=16))
        else:
            counts = [_write_one(j) for j in jobs]
        dump_yaml(classes_yaml(args), tmp / "classes.yml")
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old.exists():
                os.replace(old, target)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    single, total = map(sum, zip(*counts))
    fraction = single / total
    log(f"wrote {num_train} training and {num_val} validation images to {target}")
    log(f"single-class {BLOCK}x{BLOCK} blocks: {100 * fraction:.1f}% ({single}/{total})")
    return dict(path=target, created=True, single_class_fraction=fraction)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("dataset_root", envvar="DATASET", type=click.Path(file_okay=False))
@click.option("--num-train", default=400, show_default=True, type=int, help="Training images.")
@click.option("--num-val", default=100, show_default=True, type=int, help="Validation images.")
@click.option("--size", default=256, show_default=True, type=int, help="Image height in pixels.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the generated scenes.")
@click.option("--style", default="plain", show_default=True,
              help="plain: each class has its own colour; textured: classes differ only by texture "
                   "(stripe orientation, grain, dots, checker, grid), colours come from one shared palette.")
@click.option("--workers", default=min(2, os.cpu_count() or 1), show_default=True, type=int,
              help="Processes generating images.")
@click.option("--overwrite", is_flag=True, help="Replace an existing synthetic folder.")
def main(dataset_root, num_train, num_val, size, seed, style, workers, overwrite):
    """Generate DATASET_ROOT/synthetic (DATASET_ROOT defaults to $DATASET)."""
    with cli_errors(ValueError):
        generate_synthetic(dataset_root, num_train=num_train, num_val=num_val, size=size, seed=seed,
                           style=style, overwrite=overwrite, workers=workers)


if __name__ == "__main__":
    main()
