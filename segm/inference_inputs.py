"""The images `segm.inference` segments and their test-time views: reading and checking an image,
normalising it, and the evaluation's geometry (`evaluation_scale`, `evaluation_views`) or the
image's own (`augmented_views`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from segm.config import dataset_preset
from segm.data.base import MAX_RATIO, STATS, canonical_name, normalization_stats
from segm.data.io import pil_to_rgb, read_image
from segm.eval.window import view_plan
from segm.model.shared_schema import MAX_SIZE

__all__ = ["MAX_ASPECT_RATIO", "augmented_views", "evaluation_scale", "evaluation_views", "load_image"]

# The longest side an image may have, in multiples of its short side: a window-high strip of a
# 20000×1 image would be 1,280,000 pixels long.
MAX_ASPECT_RATIO = 32


# ----------------------------------------------------------------------------- inputs
def load_image(path, *, max_pixels: int | None = None) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, by the reader training and evaluation use
    (`segm.data.io.read_image`: stored pixel order, 16-bit and float images scaled, at most
    `max_pixels` pixels)."""
    return read_image(path, max_pixels=max_pixels)


def _as_rgb_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a PIL image or a numpy array (H, W, 3) uint8, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"numpy images must be uint8 (0..255), got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image array (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"the image is empty ({image.shape[1]}×{image.shape[0]} pixels): nothing to segment")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image[..., :3]  # RGBA: drop alpha, as PIL's convert("RGB")


def _to_tensor(image: np.ndarray, normalization: str, device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float, (x/255 - mean) / std (reference: unrounded stats)."""
    stats = STATS[normalization]
    im = torch.from_numpy(np.array(image, copy=True)).to(device).permute(2, 0, 1).float() / 255
    mean = torch.tensor(stats["mean"], device=device)[:, None, None]
    std = torch.tensor(stats["std"], device=device)[:, None, None]
    return (im - mean) / std


def _check_aspect(shape, what: str = "the image") -> None:
    h, w = shape[:2]
    if max(h, w) > MAX_ASPECT_RATIO * min(h, w):
        raise ValueError(f"{what} is {w}×{h} pixels: its long side is more than {MAX_ASPECT_RATIO} times its "
                         "short one, and resized for the windows it would be too long to segment; crop it first")


# ----------------------------------------------------------------------------- geometry
def evaluation_scale(variant: dict, im_size: int | None = None) -> tuple[int, int]:
    """(im_size, max_ratio): evaluation fits an image of the checkpoint's dataset into
    (max_ratio·im_size, im_size), keeping its aspect (`segm.data.pipelines.test_pipeline`).
    `im_size` defaults as `segm.eval.miou` on the dataset the model was trained on: its
    training size, else the dataset preset's, else the run's `inference_kwargs.im_size`."""
    dkw = variant.get("dataset_kwargs") or {}
    try:
        name = canonical_name(dkw.get("dataset") or "custom")
    except ValueError:
        name = "custom"
    if im_size is None:
        im_size = (dkw.get("image_size") or dataset_preset(name).get("im_size")
                   or (variant.get("inference_kwargs") or {}).get("im_size"))
    if im_size is None:
        raise ValueError("the model records no evaluation image size: pass --im-size N or --native-size")
    if not 1 <= int(im_size) <= MAX_SIZE:
        raise ValueError(f"--im-size must be in 1..{MAX_SIZE}, got {im_size}")
    return int(im_size), MAX_RATIO[name]


def _rescaled_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of mmcv's keep-ratio rescale into `scale` (long, short): the largest factor that
    fits both, each side rounded half up."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    size = int(h * factor + 0.5), int(w * factor + 0.5)
    if min(size) < 1:
        raise ValueError(f"the {w}×{h} image would be resized to {size[1]}×{size[0]} pixels at --im-size "
                         f"{min(scale)}: choose a larger --im-size")
    return size


def evaluation_views(image: np.ndarray, normalization: str, scale: tuple[int, int], device, *,
                     multiscale: bool = False, flip: bool = False):
    """(views, metas) of an (H, W, 3) uint8 RGB image exactly as evaluation's pipeline builds
    them (`segm.data.pipelines.test_pipeline`: keep-ratio resize of the uint8 image with OpenCV's
    bilinear filter into each ratio of (max_ratio·im_size, im_size), mirror, normalise with the
    rounded statistics), the unscaled view first (`augmented_views`)."""
    import cv2

    im_size, max_ratio = scale
    ratios, mirror = view_plan(multiscale, flip)
    ratios.sort(key=lambda r: r != 1.0)
    stats = normalization_stats(normalization)
    mean = np.array(stats["mean"], np.float32).astype(np.float64)[None]
    stdinv = 1 / np.array(stats["std"], np.float32).astype(np.float64)[None]
    views, metas = [], []
    for r in ratios:
        fit = (int(max_ratio * im_size * r), int(im_size * r))
        h, w = _rescaled_size(*image.shape[:2], fit)
        resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        for mirrored in (False, True) if mirror else (False,):
            view = (resized[:, ::-1] if mirrored else resized).astype(np.float32)
            cv2.subtract(view, mean, view)  # mmcv.imnormalize's operations, bit for bit
            cv2.multiply(view, stdinv, view)
            views.append(torch.from_numpy(view.transpose(2, 0, 1).copy()).to(device))
            metas.append({"flip": mirrored})
    return views, metas


def augmented_views(im: torch.Tensor, *, multiscale: bool = False, flip: bool = False):
    """(views, metas): the test-time views of one normalised image (3, H, W) (`view_plan`: with
    `multiscale` the evaluation's 12, scaled from the image's own size, bilinear; with `flip`
    the mirrored image too), the image itself first."""
    ratios, mirror = view_plan(multiscale, flip)
    ratios.sort(key=lambda r: r != 1.0)  # the image itself first: the sharing maps show its windows
    h, w = im.shape[-2:]
    views, metas = [], []
    for r in ratios:
        size = (int(h * r + 0.5), int(w * r + 0.5))  # mmcv.imrescale's rounding
        view = im if r == 1.0 else F.interpolate(im[None], size, mode="bilinear", align_corners=False)[0]
        for mirrored in (False, True) if mirror else (False,):
            views.append(view.flip(-1) if mirrored else view)
            metas.append({"flip": mirrored})
    return views, metas


