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

from segm import __version__
from segm.data.base import variant_normalization
from segm.data.io import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, DataError
from segm.data.label_space import to_label_space
from segm.eval.evaluate import SAVE_FORMATS, make_window_forward
from segm.eval.window import inference_views, resize_to_window, resolve_window, views_labels, window_anchors
from segm.inference_inputs import (MAX_ASPECT_RATIO, _as_rgb_array, _check_aspect, _to_tensor, augmented_views,
                                   evaluation_scale, evaluation_views, load_image)
from segm.inference_io import (IMAGE_EXTENSIONS, check_no_overwrite, check_options, list_inputs, result_path,
                               result_picture, source_path, write_picture)
from segm.policy_choice import policy_options
from segm.utils.amp import AMP_DTYPES
from segm.utils.cli import CONTEXT_SETTINGS
from segm.utils.device import DEVICE_HELP, resolve_device
from segm.utils.writable import write_error_message
from segm.visualize import checkpoint_classes, sharing_maps, sharing_overlay

__all__ = ["predict", "predict_image", "predict_probs", "load_image", "augmented_views", "evaluation_scale",
           "evaluation_views", "IMAGE_EXTENSIONS", "MAX_ASPECT_RATIO"]


# ----------------------------------------------------------------------------- prediction
def _window_forward(model, amp_dtype, records: list | None = None, first_windows: int = 0):
    """`forward(windows, boxes)` for the sliding windows (`make_window_forward`). While fewer than
    `first_windows` windows are in `records`, each batch's boxes and token map (B, Gh, Gw) are
    appended to it."""
    if records is None:
        return make_window_forward(model, amp_dtype)

    def on_map(boxes, tmap=None):
        if tmap is None:
            return sum(len(b) for b, _ in records) < first_windows
        records.append((boxes, tmap.token_of_cell.view(-1, *tmap.grid)))

    return make_window_forward(model, amp_dtype, on_map=on_map)


def _views(model, image, variant: dict, window_size, window_stride, device, multiscale: bool, flip: bool,
           im_size: int | None):
    """(views, metas, ori_shape, (ws, stride)) of one image, the first view already resized up to
    the window (the guard `inference_views` applies; here for the sharing maps)."""
    if model.needs_labels:
        raise ValueError("this model reads ground-truth labels (the oracle policy); evaluate it with segm.eval.miou")
    image = _as_rgb_array(image)
    _check_aspect(image.shape)
    ws, stride = resolve_window(model, variant, window_size=window_size, window_stride=window_stride)
    normalization = variant_normalization(variant)
    if im_size is None:
        views, metas = augmented_views(_to_tensor(image, normalization, device), multiscale=multiscale, flip=flip)
    else:
        views, metas = evaluation_views(image, normalization, evaluation_scale(variant, im_size), device,
                                        multiscale=multiscale, flip=flip)
    views = [resize_to_window(views[0], ws), *views[1:]]  # resized once: the guard leaves it as it is
    return views, metas, tuple(image.shape[:2]), (ws, stride)


def _first_windows(view, ws: int, stride: int) -> int:
    return len(window_anchors(view.shape[-2], ws, stride)) * len(window_anchors(view.shape[-1], ws, stride))


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
    return _predict(model, image, variant, window_size, window_stride, window_batch_size, device, amp_dtype,
                    multiscale, flip, return_sharing, im_size, labels=False)


def _predict(model, image, variant, window_size, window_stride, window_batch_size, device, amp_dtype,
             multiscale, flip, return_sharing, im_size, *, labels: bool):
    """`predict_probs`, or with `labels` the label map (`segm.eval.window.views_labels`)."""
    if device is None:
        device = next(model.parameters()).device
    else:
        model.to(device)
    views, metas, ori_shape, (ws, stride) = _views(model, image, variant, window_size, window_stride, device,
                                                   multiscale, flip, im_size)
    records = [] if return_sharing else None
    # The layouts shown are the first view's: its windows come first, in batches of their own.
    forward = _window_forward(model, amp_dtype, records, _first_windows(views[0], ws, stride))
    was_training = model.training
    model.eval()
    try:
        views_out = views_labels if labels else inference_views
        out = views_out(forward, views, metas, ori_shape, ws, stride, window_batch_size, model.n_cls)
    finally:
        model.train(was_training)
    if not return_sharing:
        return out
    return out, sharing_maps(records, tuple(views[0].shape[-2:]), ori_shape, ws)


@torch.no_grad()
def predict_image(model, image, *, variant: dict, window_size=None, window_stride=None, window_batch_size=4,
                  device=None, return_sharing: bool = False, amp_dtype=None, multiscale: bool = False,
                  flip: bool = False, im_size: int | None = None):
    """`predict` of one image that can also return where tokens were shared: the label map
    (H, W) int64 and, with `return_sharing`, `(shared, block_id)` (see `predict_probs`). With one
    view (no `multiscale`, no `flip`) the labels are the argmax of the logits, found without
    full-resolution logits where the view is one window (`segm.eval.window.view_labels`)."""
    out = _predict(model, image, variant, window_size, window_stride, window_batch_size, device, amp_dtype,
                   multiscale, flip, return_sharing, im_size, labels=True)
    label, maps = out if return_sharing else (out, None)
    label = label.cpu().numpy().astype(np.int64)
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
