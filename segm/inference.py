"""Segment images with a trained checkpoint, from Python or the command line.

    python -m segm.inference --model-path runs/NAME/checkpoint.pth -i IMAGES/ -o OUT/ [--show-sharing]
    python -m segm.inference --model-path ... -i test/ -o submit/ --format index   # test-server files

    model, variant = segm.load_model("runs/NAME/checkpoint.pth")
    label_map = segm.predict(model, Image.open("street.jpg"), variant=variant)   # (H, W) int64
    probs = segm.predict(model, [im1, im2], variant=variant, return_probs=True)  # [(K, H, W) float32]

Geometry: with `im_size` (the command's default: `evaluation_scale`, what `segm.eval.miou` uses)
each image is resized as evaluation resizes it (`evaluation_views`), so the label maps are the
ones validation scores; without it (`--native-size`; the library's default, as the reference)
ws×ws windows slide over the image at its own size. Either way images smaller than a window are
first scaled up so the short side fits, and the result is at the image's own size. Images whose
long side exceeds MAX_ASPECT_RATIO times the short one are refused. Inputs are converted to RGB
(grey and RGBA files work) and normalised with the checkpoint's statistics; label maps are
coloured with the palette of the checkpoint's dataset, or written as index maps in its label
space (`segm.data.label_space`). Test-time flips and scales are the evaluation's
(`segm.eval.window.inference_views` averages their probabilities).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from segm import __version__
from segm.config import dataset_preset
from segm.data.base import MAX_RATIO, STATS, canonical_name, normalization_stats, variant_normalization
from segm.data.io import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, DataError, pil_to_rgb, read_image
from segm.data.label_space import to_label_space
from segm.eval.evaluate import SAVE_FORMATS
from segm.eval.window import inference_views, resize_to_window, resolve_window, view_plan, window_anchors
from segm.inference_io import (IMAGE_EXTENSIONS, check_no_overwrite, check_options, list_inputs, result_path,
                               result_picture, source_path, write_picture)
from segm.model.shared_schema import MAX_SIZE
from segm.policy_choice import policy_options
from segm.utils.amp import AMP_DTYPES, autocast
from segm.utils.cli import CONTEXT_SETTINGS
from segm.utils.device import DEVICE_HELP, resolve_device
from segm.utils.writable import write_error_message
from segm.visualize import checkpoint_classes, sharing_maps, sharing_overlay

__all__ = ["predict", "predict_image", "predict_probs", "load_image", "augmented_views", "evaluation_scale",
           "evaluation_views", "IMAGE_EXTENSIONS", "MAX_ASPECT_RATIO"]

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


# ----------------------------------------------------------------------------- prediction
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


@torch.no_grad()
def predict_probs(model, image, *, variant: dict, window_size=None, window_stride=None, window_batch_size=4,
                  device=None, amp_dtype=None, multiscale: bool = False, flip: bool = False,
                  return_sharing: bool = False, im_size: int | None = None):
    """Class probabilities (K, H, W) float32 of one image, averaged over its test views
    (`augmented_views`; with `im_size`, `evaluation_views` at `evaluation_scale(variant, im_size)`),
    under autocast to `amp_dtype` when given.

    With `return_sharing`, also `(shared, block_id)` of the image itself (the first view):
    bool and int64 (H, W) maps at the image's size, `shared` true on pixels whose token covers
    more than one cell (CTS: a shared superpatch) and `block_id` numbering tokens (unique per window). Each window paints
    its whole area in turn, so where windows overlap and disagree the last one wins.
    """
    if model.needs_labels:
        raise ValueError("this model reads ground-truth labels (the oracle policy); evaluate it with segm.eval.miou")
    image = _as_rgb_array(image)
    _check_aspect(image.shape)
    if device is None:
        device = next(model.parameters()).device
    else:
        model.to(device)
    ws, stride = resolve_window(model, variant, window_size=window_size, window_stride=window_stride)
    normalization = variant_normalization(variant)
    ori_shape = tuple(image.shape[:2])
    if im_size is None:
        views, metas = augmented_views(_to_tensor(image, normalization, device), multiscale=multiscale, flip=flip)
    else:
        views, metas = evaluation_views(image, normalization, evaluation_scale(variant, im_size), device,
                                        multiscale=multiscale, flip=flip)
    was_training = model.training
    model.eval()
    first = resize_to_window(views[0], ws)  # the guard inference_views applies; here for the layout
    views = [first, *views[1:]]  # resized once: the guard leaves it as it is
    # The layouts shown are the first view's: its windows come first, in batches of their own.
    first_windows = len(window_anchors(first.shape[-2], ws, stride)) * len(window_anchors(first.shape[-1], ws, stride))
    records = []

    def forward(windows, boxes):
        with autocast(windows.device.type, amp_dtype):
            if not return_sharing or sum(len(b) for b, _ in records) >= first_windows:
                return model(windows).float()
            out = model.forward_all(windows)
        tmap = out.token_map
        records.append((boxes, tmap.token_of_cell.view(-1, *tmap.grid)))
        return out.logits.float()

    try:
        probs = inference_views(forward, views, metas, ori_shape, ws, stride, window_batch_size, model.n_cls)
    finally:
        model.train(was_training)
    if not return_sharing:
        return probs
    return probs, sharing_maps(records, tuple(first.shape[-2:]), ori_shape, ws)


def predict_image(model, image, *, variant: dict, window_size=None, window_stride=None, window_batch_size=4,
                  device=None, return_sharing: bool = False, amp_dtype=None, multiscale: bool = False,
                  flip: bool = False, im_size: int | None = None):
    """`predict` of one image that can also return where tokens were shared: the label map
    (H, W) int64 and, with `return_sharing`, `(shared, block_id)` (see `predict_probs`)."""
    out = predict_probs(model, image, variant=variant, window_size=window_size, window_stride=window_stride,
                        window_batch_size=window_batch_size, device=device, amp_dtype=amp_dtype,
                        multiscale=multiscale, flip=flip, return_sharing=return_sharing, im_size=im_size)
    probs, maps = out if return_sharing else (out, None)
    label = probs.argmax(0).cpu().numpy().astype(np.int64)
    return (label, maps) if return_sharing else label


def predict(model, image, *, variant: dict | None = None, window_size: int | None = None,
            window_stride: int | None = None, window_batch_size: int = 4, device=None, amp_dtype=None,
            multiscale: bool = False, flip: bool = False, return_probs: bool = False, im_size: int | None = None):
    """Label map (H, W) int64 of one image (PIL image or (H, W[, 3|4]) uint8 array) at its own size;
    with `return_probs`, its class probabilities (K, H, W) float32 instead. A list of images
    gives a list of results.

    Sliding ws×ws windows (default: the checkpoint's window and stride, see `inference_kwargs`)
    over the unresized image, or with `im_size` over the image resized as evaluation resizes it
    (`evaluation_views`; `evaluation_scale(variant)[0]` is the size `segm.eval.miou` uses).
    `variant` is what `segm.load_model` returned with the model; without it, `model.variant` is
    used (set by this module's loader). With `device`, the model is moved there; otherwise the
    image goes to the model's device. `amp_dtype` (torch.bfloat16 / torch.float16) autocasts the
    forward passes; `multiscale` and `flip` average the evaluation's test-time views
    (`augmented_views`).
    """
    variant = variant if variant is not None else getattr(model, "variant", None)
    if variant is None:
        raise ValueError("predict needs the checkpoint's variant: model, variant = segm.load_model(path); "
                         "predict(model, image, variant=variant)")
    options = dict(variant=variant, window_size=window_size, window_stride=window_stride,
                   window_batch_size=window_batch_size, device=device, amp_dtype=amp_dtype,
                   multiscale=multiscale, flip=flip, im_size=im_size)
    if isinstance(image, (list, tuple)):
        return [predict(model, im, **options, return_probs=return_probs) for im in image]
    if return_probs:
        return predict_probs(model, image, **options).float().cpu().numpy()
    return predict_image(model, image, **options)


# ----------------------------------------------------------------------------- command
def _load(model_path, onnx_path, policy: dict, window_batch_size: int, device):
    from segm.model.factory import load_model
    from segm.onnx_runtime import load_for_inference
    from segm.policy_choice import apply_policy_choice, policy_choice

    choice = policy_choice(**policy)
    if onnx_path is not None or model_path is None:
        model, variant = load_for_inference(onnx_path, model_path, choice, window_batch_size)
    else:
        model, variant = apply_policy_choice(*load_model(model_path), choice)
    model.variant = variant
    return model.to(device), variant


def _segment_all(model, variant, input_path: Path, output_dir: Path, images: list, *, picture, sharing: bool,
                 max_pixels, options: dict) -> list[str]:
    """Segments and writes every image; returns the inputs that could not be read."""
    from tqdm import tqdm

    unreadable = []
    for rel in tqdm(images, desc="inference", disable=len(images) < 2):
        try:
            path = source_path(input_path, rel)
            image = load_image(path, max_pixels=max_pixels)
            _check_aspect(image.shape, f"image {path}")
        except (DataError, ValueError) as e:  # one bad file does not stop the folder
            if not input_path.is_dir():
                raise
            unreadable.append(str(rel))
            tqdm.write(f"skipped: {e}", file=sys.stderr)
            continue
        out = predict_image(model, image, variant=variant, return_sharing=sharing, **options)
        label, maps = out if sharing else (out, None)
        write_picture(picture(image, label), result_path(output_dir, rel))
        if maps is not None:
            write_picture(sharing_overlay(image, *maps), result_path(output_dir, rel, "_sharing"))
    return unreadable


@click.command(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="segm.inference")
@click.option("--model-path", default=None, type=str, help="checkpoint.pth (variant.yml beside it); or --onnx.")
@click.option("--onnx", "onnx_path", default=None, type=str,
              help="An exported model (python -m segm.export) to run in ONNX Runtime instead of a checkpoint.")
@click.option("-i", "--input", "input_path", required=True, type=click.Path(exists=True, path_type=Path),
              help="An image, or a folder: every image below it, sub-folders included.")
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for the results (<name>.png, under the input's relative path).")
@click.option("--device", default=None, type=str, help=f"{DEVICE_HELP} (default: auto).")
@click.option("--gpu/--cpu", "gpu", default=None, help="Reference spelling of --device cuda / cpu.")
@click.option("--window-batch-size", default=2, show_default=True, type=int, help="Windows per forward pass.")
@click.option("--show-sharing", is_flag=True, help="Also write <name>_sharing.png (CTS models).")
@click.option("--blend/--no-blend", default=True, show_default=True, help="Blend the colours with the input.")
@click.option("--window-size", default=None, type=int,
              help="Sliding-window size (default: the run's inference window, else the crop).")
@click.option("--window-stride", default=None, type=int,
              help="Sliding-window stride (default: the run's inference stride, at most the window).")
@click.option("--im-size", default=None, type=int,
              help="Resize each image as evaluation does, to this short side (default: the size segm.eval.miou "
                   "uses for the model's dataset).")
@click.option("--native-size", is_flag=True,
              help="Segment each image at its own size instead of evaluation's (the reference's inference).")
@click.option("--max-pixels", default=None, type=int,
              help=f"Refuse images of more pixels, before decoding them (default: ${MAX_PIXELS_ENV}, else "
                   f"{DEFAULT_MAX_PIXELS}).")
@click.option("--amp", type=click.Choice(sorted(AMP_DTYPES)), default=None,
              help="Autocast the forward passes to this dtype (default: fp32).")
@click.option("--multiscale/--singlescale", default=False, show_default=True,
              help="Average the evaluation's 12 views: scales 0.5-1.75 of the image, each also mirrored.")
@click.option("--flip", is_flag=True, help="Also average the mirrored image.")
@click.option("--format", "out_format", type=click.Choice(SAVE_FORMATS), default="overlay", show_default=True,
              help="overlay: class colours; index: 8-bit label maps in the dataset's label space, as test "
                   "servers take them (ADE20K 1..150, Cityscapes label ids, others the train labels).")
@click.option("--legend/--no-legend", default=True, show_default=True,
              help="Below each overlay, a strip of the classes present with their colours.")
@policy_options
def main(model_path, onnx_path, input_path, output_dir, device, gpu, window_batch_size, show_sharing, blend,
         window_size, window_stride, im_size, native_size, max_pixels, amp, multiscale, flip, out_format, legend,
         **policy):
    """Segment the images of INPUT into OUTPUT with a trained checkpoint."""
    from segm.utils.checkpoint import CheckpointError

    if device is None and gpu is not None:
        device = "cuda" if gpu else "cpu"
    try:
        device = resolve_device(device)
        check_options(window_batch_size, max_pixels, native_size, im_size, onnx_path, amp, output_dir)
        images, problems = list_inputs(input_path, output_dir)
        check_no_overwrite(input_path, output_dir, images)
        model, variant = _load(model_path, onnx_path, policy, window_batch_size, device)
        resolve_window(model, variant, window_size=window_size, window_stride=window_stride)  # before any image
        options = dict(window_size=window_size, window_stride=window_stride, window_batch_size=window_batch_size,
                       amp_dtype=AMP_DTYPES.get(amp), multiscale=multiscale, flip=flip,
                       im_size=None if native_size else evaluation_scale(variant, im_size)[0])
        names, palette, note = checkpoint_classes(variant, model.n_cls)
        if note and out_format == "overlay":
            warnings.warn(note, stacklevel=1)
        dataset = (variant.get("dataset_kwargs") or {}).get("dataset")
        if out_format == "index":
            to_label_space(np.arange(model.n_cls), dataset)  # the model's classes exist there, or one error now
        sharing = show_sharing and model.shares_tokens
        if show_sharing and not sharing:
            click.echo("--show-sharing: this model reduces no tokens (reducer none); no sharing images", err=True)
        for _, line in problems:
            click.echo(f"skipped: {line}", err=True)
        unreadable = _segment_all(model, variant, input_path, output_dir, images, sharing=sharing,
                                  picture=result_picture(out_format, dataset, palette, names, blend, legend),
                                  max_pixels=max_pixels, options=options)
    except (FileNotFoundError, ValueError, TypeError, CheckpointError) as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    except OSError as e:  # the output folder: disk full, permission denied
        raise click.ClickException(write_error_message(e)) from None
    click.echo(f"wrote {len(images) - len(unreadable)} image(s) to {output_dir}")
    failed = [name for name, _ in problems] + unreadable
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(images) + len(problems)} images could not be read: "
                                   f"{', '.join(failed)}")


if __name__ == "__main__":
    main()
