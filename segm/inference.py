"""Segment images with a trained checkpoint, from Python or the command line.

    python -m segm.inference --model-path runs/NAME/checkpoint.pth -i IMAGES/ -o OUT/ [--show-sharing]

    model, variant = segm.load_model("runs/NAME/checkpoint.pth")
    label_map = segm.predict(model, Image.open("street.jpg"), variant=variant)   # (H, W) int64

As in the reference the image is not resized: ws×ws windows slide over it at its own size
(images smaller than a window are first scaled up so the short side fits, and the result is
scaled back). Inputs are converted to RGB (grey and RGBA files work) and normalised with the
checkpoint's statistics; label maps are coloured with the palette of the checkpoint's dataset.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image

from segm.data.base import STATS
from segm.data.io import pil_to_rgb, read_image
from segm.eval.window import inference_views, resize_to_window, resolve_window
from segm.policy_choice import policy_options
from segm.visualize import blend_images, checkpoint_palette, colorize, save_png, sharing_maps, sharing_overlay

__all__ = ["predict", "predict_image", "load_image"]

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
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image[..., :3]  # RGBA: drop alpha, as PIL's convert("RGB")


def _normalization(variant: dict) -> str:
    norm = (variant.get("dataset_kwargs") or {}).get("normalization") or (variant.get("net_kwargs") or {}).get(
        "normalization"
    )
    if norm not in STATS:
        raise ValueError(f"the variant names no known normalization (got {norm!r}; expected one of {sorted(STATS)})")
    return norm


def _to_tensor(image: np.ndarray, normalization: str, device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float, (x/255 - mean) / std (reference: unrounded stats)."""
    stats = STATS[normalization]
    im = torch.from_numpy(np.array(image, copy=True)).to(device).permute(2, 0, 1).float() / 255
    mean = torch.tensor(stats["mean"], device=device)[:, None, None]
    std = torch.tensor(stats["std"], device=device)[:, None, None]
    return (im - mean) / std


# ----------------------------------------------------------------------------- prediction
@torch.no_grad()
def predict_image(model, image, *, variant: dict, window_size=None, window_stride=None, window_batch_size=4,
                  device=None, return_sharing: bool = False):
    """`predict` that can also return where tokens were shared.

    Returns the label map (H, W) int64 and, with `return_sharing`, `(shared, block_id)`:
    bool and int64 (H, W) maps at the image's size, `shared` true on pixels of a shared
    superpatch and `block_id` numbering superpatches (unique per window). Each window paints
    its whole area in turn, so where windows overlap and disagree the last one wins.
    """
    if model.needs_labels:
        raise ValueError("an oracle-policy model needs ground-truth labels; evaluate it with segm.eval.miou")
    image = _as_rgb_array(image)
    if device is None:
        device = next(model.parameters()).device
    else:
        model.to(device)
    was_training = model.training
    model.eval()
    ws, stride = resolve_window(model, variant, window_size=window_size, window_stride=window_stride)
    im = _to_tensor(image, _normalization(variant), device)
    ori_shape = tuple(im.shape[-2:])
    view = resize_to_window(im, ws)  # the guard inference_views would apply; done here for the layout

    records = []

    def forward(windows, boxes):
        if not return_sharing:
            return model(windows).float()
        out = model.forward_all(windows)
        records.append((boxes, out.layout.masks()[1]))
        return out.logits.float()

    try:
        probs = inference_views(forward, [view], [{"flip": False}], ori_shape, ws, stride, window_batch_size,
                                model.n_cls)
    finally:
        model.train(was_training)
    label = probs.argmax(0).cpu().numpy().astype(np.int64)
    if not return_sharing:
        return label
    return label, sharing_maps(records, tuple(view.shape[-2:]), ori_shape, ws)


def predict(model, image, *, variant: dict | None = None, window_size: int | None = None,
            window_stride: int | None = None, window_batch_size: int = 4, device=None) -> np.ndarray:
    """Label map (H, W) int64 of one image (PIL image or (H, W[, 3|4]) uint8 array) at its own size.

    Sliding ws×ws windows (default: the checkpoint's window and stride, see `inference_kwargs`)
    over the unresized image. `variant` is what `segm.load_model` returned with the model;
    without it, `model.variant` is used (set by this module's loader). With `device`, the
    model is moved there; otherwise the image goes to the model's device.
    """
    variant = variant if variant is not None else getattr(model, "variant", None)
    if variant is None:
        raise ValueError("predict needs the checkpoint's variant: model, variant = segm.load_model(path); "
                         "predict(model, image, variant=variant)")
    return predict_image(model, image, variant=variant, window_size=window_size, window_stride=window_stride,
                         window_batch_size=window_batch_size, device=device)


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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model-path", required=True, type=str, help="checkpoint.pth (variant.yml beside it).")
@click.option("-i", "--input", "input_path", required=True, type=click.Path(exists=True, path_type=Path),
              help="An image or a folder of images.")
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for the results (<name>.png).")
@click.option("--device", default=None, type=str, help="Default: cuda if available, else cpu.")
@click.option("--gpu/--cpu", "gpu", default=None, help="Reference spelling of --device cuda / cpu.")
@click.option("--window-batch-size", default=2, show_default=True, type=int)
@click.option("--show-sharing", is_flag=True, help="Also write <name>_sharing.png (CTS models).")
@click.option("--blend/--no-blend", default=True, show_default=True, help="Blend the colours with the input.")
@policy_options
def main(model_path, input_path, output_dir, device, gpu, window_batch_size, show_sharing, blend, **policy):
    """Segment the images of INPUT into OUTPUT with a trained checkpoint."""
    from tqdm import tqdm

    from segm.model.factory import load_model
    from segm.policy_choice import apply_policy_choice, policy_choice
    from segm.utils.checkpoint import CheckpointError

    if device is None:
        device = ("cuda" if gpu else "cpu") if gpu is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if window_batch_size < 1:
            raise ValueError(f"--window-batch-size must be >= 1, got {window_batch_size}")
        if output_dir.exists() and not output_dir.is_dir():
            raise ValueError(f"output {output_dir} exists and is not a folder")
        files = _list_inputs(input_path)
        clash = [p for p in files if (output_dir / f"{p.stem}.png").resolve() == p.resolve()]
        if clash:
            raise ValueError(f"the output {output_dir / clash[0].name} would overwrite its input: choose another -o")
        choice = policy_choice(**policy)
        model, variant = apply_policy_choice(*load_model(model_path), choice)
        model.variant = variant
        model.to(device)
        palette, note = checkpoint_palette(variant, model.n_cls)
        if note:
            warnings.warn(note, stacklevel=1)
        sharing = show_sharing and model.shares_tokens
        if show_sharing and not sharing:
            click.echo("--show-sharing: this model shares no tokens (policy no_sharing); no sharing images", err=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        for path in tqdm(files, desc="inference", disable=len(files) < 2):
            image = load_image(path)
            out = predict_image(model, image, variant=variant, window_batch_size=window_batch_size,
                                return_sharing=sharing)
            label, maps = out if sharing else (out, None)
            seg = colorize(label, palette)
            save_png(blend_images(image, seg) if blend else seg, output_dir / f"{path.stem}.png")
            if maps is not None:
                save_png(sharing_overlay(image, *maps), output_dir / f"{path.stem}_sharing.png")
    except (FileNotFoundError, ValueError, TypeError, CheckpointError) as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    click.echo(f"wrote {len(files)} image(s) to {output_dir}")


if __name__ == "__main__":
    main()
