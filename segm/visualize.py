"""Pictures of predictions: class colours, blends with the input, class legends, token-sharing
overlays, PNGs.

Used by the evaluation's saved images (`segm.eval.evaluate`) and by `segm.inference`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from segm.data.base import dataset_info, generated_palette
from segm.utils.atomic import atomic_write

__all__ = ["SHARING_COLOR", "colorize", "blend_images", "with_legend", "save_png", "checkpoint_classes",
           "checkpoint_palette", "sharing_maps", "sharing_overlay"]

SHARING_COLOR = (255, 0, 255)


def colorize(label: np.ndarray, palette) -> np.ndarray:
    """(H, W) class map -> (H, W, 3) uint8 RGB; labels outside the palette (255) are black."""
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: min(len(palette), 256)] = palette[:256]
    return lut[np.asarray(label).astype(np.int64).clip(0, 255)]


def blend_images(im: np.ndarray, seg_rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """50/50 blend as the reference (`PIL.Image.blend`)."""
    return np.asarray(Image.blend(Image.fromarray(im), Image.fromarray(seg_rgb), alpha).convert("RGB"))


def with_legend(picture: np.ndarray, label: np.ndarray, palette, class_names=None) -> np.ndarray:
    """`picture` (H, W, 3) with a white strip below listing the classes present in `label`, each
    as a swatch of its colour and its name (`class i` without names), wrapped to the width."""
    from PIL import ImageDraw, ImageFont

    try:  # text that scales with the picture: 12 px at 512, 25 px at 1024 × 2048
        font = ImageFont.load_default(size=int(np.clip(min(picture.shape[:2]) / 40, 10, 32)))
    except TypeError:  # Pillow < 10.1: its one bitmap font
        font = ImageFont.load_default()
    present = [int(c) for c in np.unique(label) if c < len(palette)]
    names = [class_names[c] if class_names else f"class {c}" for c in present]
    width, pad = picture.shape[1], 4
    line = font.getbbox("Ag")[3] + 2 * pad
    box = line - 2 * pad
    places, x, y = [], pad, pad
    for name in names:
        entry = box + pad + int(np.ceil(font.getlength(name)))
        if x > pad and x + entry > width:  # wrap; an entry wider than the picture is cut
            x, y = pad, y + line
        places.append((x, y))
        x += entry + 3 * pad
    strip = Image.new("RGB", (width, y + line if names else 0), "white")
    draw = ImageDraw.Draw(strip)
    for c, name, (x, y) in zip(present, names, places):
        draw.rectangle((x, y, x + box - 1, y + box - 1), fill=tuple(int(v) for v in palette[c]), outline="black")
        top, bottom = font.getbbox(name)[1::2]
        draw.text((x + box + pad, y + (box - top - bottom) // 2), name, fill="black", font=font)
    return np.concatenate([picture, np.asarray(strip)], axis=0)


def save_png(array: np.ndarray, path) -> None:
    """Writes a PNG atomically (`segm.utils.atomic.atomic_write`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def checkpoint_classes(variant: dict, n_cls: int) -> tuple[list | None, list, str | None]:
    """(class names or None, palette, note) of the checkpoint's dataset: those a shared model
    carries, else its dataset's; a generated palette (and why, in `note`) when its classes
    cannot be found or do not match the model."""
    embedded = variant.get("classes") or {}  # a shared model carries its own
    names = list(embedded["names"]) if len(embedded.get("names") or ()) == n_cls else None
    if len(embedded.get("palette") or ()) == n_cls:
        return names, [list(c) for c in embedded["palette"]], None
    short = [f"its {k} list has {len(embedded[k])} entries for {n_cls} classes"
             for k in ("names", "palette") if embedded.get(k) and len(embedded[k]) != n_cls]
    dkw = variant.get("dataset_kwargs") or {}
    name = dkw.get("dataset")
    try:
        if name is None:
            raise ValueError("the variant names no dataset")
        info = dataset_info(name, data_root=dkw.get("data_root"), classes_file=dkw.get("classes_file"))
        if info.n_cls == n_cls:
            return names or list(info.class_names), [list(c) for c in info.palette], None
        reason = f"dataset {name} has {info.n_cls} classes, the model {n_cls}"
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        reason = str(e).splitlines()[0]
    if short:  # the model's own classes are what is wrong, whatever the dataset lookup says
        reason = f"the model's classes do not fit: {'; '.join(short)}"
    return names, generated_palette(n_cls), f"using a generated palette ({reason})"


def checkpoint_palette(variant: dict, n_cls: int) -> tuple[list, str | None]:
    """(palette, note) of `checkpoint_classes`."""
    _, palette, note = checkpoint_classes(variant, n_cls)
    return palette, note


def sharing_maps(records, view_shape, ori_shape, ws):
    """(shared, block_id) maps at `ori_shape` from the windows' token maps.

    `records` holds, per window batch, the windows' top-left corners on the view and their
    `token_of_cell` (n, Gh, Gw) (`TokenMap`). A cell is shared when its token covers more than
    one cell; `block_id` numbers the tokens (unique per window). Each window paints its cells
    at its position on the view (the last one wins where windows overlap); the maps are then
    resized (nearest) to the original image."""
    shared = torch.zeros(view_shape, dtype=torch.bool)
    block_id = torch.full(view_shape, -1, dtype=torch.int64)
    n_windows = 0
    for boxes, token_of_cell in records:
        token_of_cell = token_of_cell.cpu()
        n, g_h, g_w = token_of_cell.shape
        flat = token_of_cell.reshape(n, -1)
        counts = torch.zeros(n, g_h * g_w, dtype=torch.int64).scatter_add_(1, flat, torch.ones_like(flat))
        merged = counts.gather(1, flat).view(n, g_h, g_w) > 1
        cs = ws // g_h  # cell side in pixels (the patch size)
        for (y, x), m, ids in zip(boxes, merged, token_of_cell):
            shared[y : y + ws, x : x + ws] = m.repeat_interleave(cs, 0).repeat_interleave(cs, 1)
            block_id[y : y + ws, x : x + ws] = (ids + n_windows * g_h * g_w).repeat_interleave(cs, 0).repeat_interleave(cs, 1)
            n_windows += 1
    if view_shape != ori_shape:
        both = torch.stack([shared.double(), block_id.double()])[None]
        shared_f, block_f = F.interpolate(both, ori_shape, mode="nearest")[0]
        shared, block_id = shared_f.bool(), block_f.long()
    return shared.numpy(), block_id.numpy()


def sharing_overlay(image: np.ndarray, shared: np.ndarray, block_id: np.ndarray, color=SHARING_COLOR) -> np.ndarray:
    """The image with shared (merged) cells tinted (40 %) and each shared token outlined (1 px) in `color`."""
    out = image.astype(np.float32)
    color = np.asarray(color, dtype=np.float32)
    out[shared] = 0.6 * out[shared] + 0.4 * color
    edge = np.zeros_like(shared)
    dy = block_id[1:] != block_id[:-1]
    dx = block_id[:, 1:] != block_id[:, :-1]
    edge[1:] |= dy
    edge[:-1] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    out[edge & shared] = color
    return out.round().clip(0, 255).astype(np.uint8)
