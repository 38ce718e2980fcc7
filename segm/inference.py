"""Segment images with a trained checkpoint, from Python or the command line.

    python -m segm.inference --model-path runs/NAME/checkpoint.pth -i IMAGES/ -o OUT/ [--show-sharing]
    python -m segm.inference --model-path ... -i test/ -o submit/ --format index   # test-server files

    model, variant = segm.load_model("runs/NAME/checkpoint.pth")
    label_map = segm.predict(model, Image.open("street.jpg"), variant=variant)   # (H, W) int64
    probs = segm.predict(model, [im1, im2], variant=variant, return_probs=True)  # [(K, H, W) float32]

As in the reference the image is not resized: ws×ws windows slide over it at its own size
(images smaller than a window are first scaled up so the short side fits, and the result is
scaled back). Inputs are converted to RGB (grey and RGBA files work) and normalised with the
checkpoint's statistics; label maps are coloured with the palette of the checkpoint's dataset,
or written as index maps in its label space (`segm.data.label_space`). Test-time flips and
scales are the evaluation's (`segm.eval.window.inference_views` averages their probabilities).
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
from segm.data.base import STATS, variant_normalization
from segm.data.io import DataError, pil_to_rgb, read_image
from segm.data.label_space import to_label_space
from segm.eval.evaluate import SAVE_FORMATS
from segm.eval.window import inference_views, resize_to_window, resolve_window, view_plan, window_anchors
from segm.policy_choice import policy_options
from segm.utils.amp import AMP_DTYPES, autocast
from segm.utils.cli import CONTEXT_SETTINGS
from segm.utils.device import DEVICE_HELP, resolve_device
from segm.utils.writable import check_writable, write_error_message
from segm.visualize import (blend_images, checkpoint_classes, colorize, save_png, sharing_maps, sharing_overlay,
                            with_legend)

__all__ = ["predict", "predict_image", "predict_probs", "load_image", "augmented_views"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


# ----------------------------------------------------------------------------- inputs
def load_image(path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, by the reader training and evaluation use
    (`segm.data.io.read_image`: stored pixel order, 16-bit and float images scaled)."""
    return read_image(path)


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
                  return_sharing: bool = False):
    """Class probabilities (K, H, W) float32 of one image, averaged over its test views
    (`augmented_views`), under autocast to `amp_dtype` when given.

    With `return_sharing`, also `(shared, block_id)` of the image itself (the first view):
    bool and int64 (H, W) maps at the image's size, `shared` true on pixels whose token covers
    more than one cell (CTS: a shared superpatch) and `block_id` numbering tokens (unique per window). Each window paints
    its whole area in turn, so where windows overlap and disagree the last one wins.
    """
    if model.needs_labels:
        raise ValueError("this model reads ground-truth labels (the oracle policy); evaluate it with segm.eval.miou")
    image = _as_rgb_array(image)
    if device is None:
        device = next(model.parameters()).device
    else:
        model.to(device)
    was_training = model.training
    model.eval()
    ws, stride = resolve_window(model, variant, window_size=window_size, window_stride=window_stride)
    im = _to_tensor(image, variant_normalization(variant), device)
    ori_shape = tuple(im.shape[-2:])
    views, metas = augmented_views(im, multiscale=multiscale, flip=flip)
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
                  flip: bool = False):
    """`predict` of one image that can also return where tokens were shared: the label map
    (H, W) int64 and, with `return_sharing`, `(shared, block_id)` (see `predict_probs`)."""
    out = predict_probs(model, image, variant=variant, window_size=window_size, window_stride=window_stride,
                        window_batch_size=window_batch_size, device=device, amp_dtype=amp_dtype,
                        multiscale=multiscale, flip=flip, return_sharing=return_sharing)
    probs, maps = out if return_sharing else (out, None)
    label = probs.argmax(0).cpu().numpy().astype(np.int64)
    return (label, maps) if return_sharing else label


def predict(model, image, *, variant: dict | None = None, window_size: int | None = None,
            window_stride: int | None = None, window_batch_size: int = 4, device=None, amp_dtype=None,
            multiscale: bool = False, flip: bool = False, return_probs: bool = False):
    """Label map (H, W) int64 of one image (PIL image or (H, W[, 3|4]) uint8 array) at its own size;
    with `return_probs`, its class probabilities (K, H, W) float32 instead. A list of images
    gives a list of results.

    Sliding ws×ws windows (default: the checkpoint's window and stride, see `inference_kwargs`)
    over the unresized image. `variant` is what `segm.load_model` returned with the model;
    without it, `model.variant` is used (set by this module's loader). With `device`, the
    model is moved there; otherwise the image goes to the model's device. `amp_dtype`
    (torch.bfloat16 / torch.float16) autocasts the forward passes; `multiscale` and `flip`
    average the evaluation's test-time views (`augmented_views`).
    """
    variant = variant if variant is not None else getattr(model, "variant", None)
    if variant is None:
        raise ValueError("predict needs the checkpoint's variant: model, variant = segm.load_model(path); "
                         "predict(model, image, variant=variant)")
    options = dict(variant=variant, window_size=window_size, window_stride=window_stride,
                   window_batch_size=window_batch_size, device=device, amp_dtype=amp_dtype,
                   multiscale=multiscale, flip=flip)
    if isinstance(image, (list, tuple)):
        return [predict(model, im, **options, return_probs=return_probs) for im in image]
    if return_probs:
        return predict_probs(model, image, **options).float().cpu().numpy()
    return predict_image(model, image, **options)


# ----------------------------------------------------------------------------- command
def _list_inputs(input_path: Path) -> list[Path]:
    if input_path.is_file():
        return [input_path]
    files = sorted(p for p in input_path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {input_path}")
    stems = {}
    for p in files:
        if p.stem in stems:
            raise ValueError(f"{stems[p.stem].name} and {p.name} would both be written as {p.stem}.png: rename one")
        stems[p.stem] = p
    return files


def _result_picture(out_format: str, dataset: str | None, palette, class_names, blend: bool, legend: bool):
    """`picture(image, label)`, what `<name>.png` holds: the index map in the label space of
    `dataset` (8-bit, one channel), or the coloured labels, blended with the image and with a
    legend of the classes present as asked."""
    def picture(image, label):
        if out_format == "index":
            return to_label_space(label, dataset)
        seg = colorize(label, palette)
        seg = blend_images(image, seg) if blend else seg
        return with_legend(seg, label, palette, class_names) if legend else seg

    return picture


@click.command(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="segm.inference")
@click.option("--model-path", default=None, type=str, help="checkpoint.pth (variant.yml beside it); or --onnx.")
@click.option("--onnx", "onnx_path", default=None, type=str,
              help="An exported model (python -m segm.export) to run in ONNX Runtime instead of a checkpoint.")
@click.option("-i", "--input", "input_path", required=True, type=click.Path(exists=True, path_type=Path),
              help="An image or a folder of images.")
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for the results (<name>.png).")
@click.option("--device", default=None, type=str, help=f"{DEVICE_HELP} (default: auto).")
@click.option("--gpu/--cpu", "gpu", default=None, help="Reference spelling of --device cuda / cpu.")
@click.option("--window-batch-size", default=2, show_default=True, type=int, help="Windows per forward pass.")
@click.option("--show-sharing", is_flag=True, help="Also write <name>_sharing.png (CTS models).")
@click.option("--blend/--no-blend", default=True, show_default=True, help="Blend the colours with the input.")
@click.option("--window-size", default=None, type=int,
              help="Sliding-window size (default: the run's inference window, else the crop).")
@click.option("--window-stride", default=None, type=int,
              help="Sliding-window stride (default: the run's inference stride, at most the window).")
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
         window_size, window_stride, amp, multiscale, flip, out_format, legend, **policy):
    """Segment the images of INPUT into OUTPUT with a trained checkpoint."""
    from tqdm import tqdm

    from segm.model.factory import load_model
    from segm.onnx_runtime import load_for_inference
    from segm.policy_choice import apply_policy_choice, policy_choice
    from segm.utils.checkpoint import CheckpointError

    if device is None and gpu is not None:
        device = "cuda" if gpu else "cpu"
    try:
        device = resolve_device(device)
        if window_batch_size < 1:
            raise ValueError(f"--window-batch-size must be >= 1, got {window_batch_size}")
        if output_dir.exists() and not output_dir.is_dir():
            raise ValueError(f"output {output_dir} exists and is not a folder")
        check_writable(output_dir, "-o/--output")
        files = _list_inputs(input_path)
        clash = [p for p in files if (output_dir / f"{p.stem}.png").resolve() == p.resolve()]
        if clash:
            raise ValueError(f"the output {output_dir / clash[0].name} would overwrite its input: choose another -o")
        choice = policy_choice(**policy)
        if onnx_path is not None and amp is not None:
            raise ValueError("--amp does not apply to an ONNX model (ONNX Runtime runs the exported fp32 graph); drop it")
        if onnx_path is not None or model_path is None:
            model, variant = load_for_inference(onnx_path, model_path, choice, window_batch_size)
        else:
            model, variant = apply_policy_choice(*load_model(model_path), choice)
        model.variant = variant
        model.to(device)
        names, palette, note = checkpoint_classes(variant, model.n_cls)
        if note and out_format == "overlay":
            warnings.warn(note, stacklevel=1)
        dataset = (variant.get("dataset_kwargs") or {}).get("dataset")
        if out_format == "index":
            to_label_space(np.arange(model.n_cls), dataset)  # the model's classes exist there, or one error now
        picture = _result_picture(out_format, dataset, palette, names, blend, legend)
        sharing = show_sharing and model.shares_tokens
        if show_sharing and not sharing:
            click.echo("--show-sharing: this model reduces no tokens (reducer none); no sharing images", err=True)
        unreadable = []
        for path in tqdm(files, desc="inference", disable=len(files) < 2):
            try:
                image = load_image(path)
            except DataError as e:  # one bad file does not stop the folder
                if len(files) == 1:
                    raise
                unreadable.append(path.name)
                tqdm.write(f"skipped: {e}", file=sys.stderr)
                continue
            out = predict_image(model, image, variant=variant, window_size=window_size, window_stride=window_stride,
                                window_batch_size=window_batch_size, return_sharing=sharing,
                                amp_dtype=AMP_DTYPES.get(amp), multiscale=multiscale, flip=flip)
            label, maps = out if sharing else (out, None)
            output_dir.mkdir(parents=True, exist_ok=True)  # not before an image could be read
            save_png(picture(image, label), output_dir / f"{path.stem}.png")
            if maps is not None:
                save_png(sharing_overlay(image, *maps), output_dir / f"{path.stem}_sharing.png")
    except (FileNotFoundError, ValueError, TypeError, CheckpointError) as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    except OSError as e:  # the output folder: disk full, permission denied
        raise click.ClickException(write_error_message(e)) from None
    click.echo(f"wrote {len(files) - len(unreadable)} image(s) to {output_dir}")
    if unreadable:
        raise click.ClickException(
            f"{len(unreadable)} of {len(files)} images could not be read: {', '.join(unreadable)}")


if __name__ == "__main__":
    main()
