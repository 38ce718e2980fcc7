"""Sliding-window inference, and the one rule for its window size and stride. See
docs/DESIGN.md, "Evaluation".

Per view: resize up so the short side is at least the window, cut ws×ws windows on a
grid whose last row/column is flush with the border, run them `window_batch_size` at
a time, average overlapping logits, resize to the original shape, un-flip, softmax.
The probabilities of all views are averaged.

`forward(windows, boxes)` takes windows (n, 3, ws, ws) and their top-left corners
[(y0, x0), ...] in the (resized) view, and returns logits (n, K, ws, ws), or `GridScores`: the
class scores on the windows' patch grid before the model's ×P upsampling, which the canvas then
receives a band of rows at a time (`segm.model.labels.upsampled_bands`), the same values without a
fresh (n, K, ws, ws) buffer per batch of windows.

`view_labels` is the label path of one view: where it is one window at the image's size, the
argmax is taken band by band (`labels_from_scores`) and no K × H × W logits exist; otherwise the
canvas is resized to the image a chunk of classes at a time (`resized_labels`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from segm.config import dataset_preset
from segm.model.labels import labels_from_scores, resized_labels, upsampled_bands

__all__ = ["GridScores", "view_labels", "views_labels", "resolve_window", "check_stride", "window_anchors",
           "resize_to_window", "sliding_window_inference", "inference_views", "MULTISCALE_RATIOS", "view_plan"]


class GridScores(NamedTuple):
    """A window forward's class scores before upsampling: (n, K, Gh, Gw) on the patch grid of
    the windows (padded to a multiple of `patch`), in the forward's dtype."""

    masks: torch.Tensor
    patch: int


Forward = Callable[[torch.Tensor, list], "torch.Tensor | GridScores"]

# The scales of the multi-scale views, as ratios of the test size (the reference's).
MULTISCALE_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def view_plan(multiscale: bool, flip: bool = False) -> tuple[list[float], bool]:
    """The test-time views of an image: (the ratios of its size to view it at, whether each is
    also mirrored). Multi-scale: the 12 views of MULTISCALE_RATIOS, each mirrored; otherwise
    the image alone, mirrored too with `flip`. The evaluation pipeline
    (`segm.data.pipelines.test_pipeline`) and `segm.inference.augmented_views` build these."""
    return (list(MULTISCALE_RATIOS) if multiscale else [1.0]), bool(multiscale or flip)


def resolve_window(model, variant: dict, dataset: str | None = None, window_size: int | None = None,
                   window_stride: int | None = None) -> tuple[int, int]:
    """(window size, stride) for running `model` (its `crop_size`, `reduction_method`) over images.

    Given values win; the defaults are the reference's, which differ by command:

    - window size: evaluating on a `dataset`, the run's training crop
      (`dataset_kwargs.crop_size`); segmenting images (no dataset), the run's
      `inference_kwargs.window_size`; else the model's crop. A token-sharing model runs only
      at its crop (`segm.model.reduction.rules.check_window`).
    - stride: the first that fits in the window of, on a `dataset`, its stride in
      configs/config.yml (ADE20K 512, Cityscapes 512, Pascal-Context 320), then the run's
      `inference_kwargs.window_stride`, then the window size itself.

    A window size below 1 or a stride outside 1..window size is an error (`check_stride`).
    """
    from segm.model.reduction.rules import check_window  # no torch: the window mechanics need none

    run = variant.get("inference_kwargs") or {}
    if dataset is None:
        run_window, strides = run.get("window_size"), [run.get("window_stride")]
    else:
        preset = dataset_preset(dataset)
        run_window = (variant.get("dataset_kwargs") or {}).get("crop_size")
        strides = [preset.get("window_stride"), run.get("window_stride")]
    crop = tuple(model.crop_size)
    if window_size is None:
        window_size = int(run_window or crop[0])
    if window_size < 1:  # before the stride, which defaults to it
        raise ValueError(f"window size {window_size} must be ≥ 1 (--window-size, window_size)")
    check_window(model.reduction_method, crop, (window_size, window_size))
    if window_stride is None:
        window_stride = next(int(s) for s in [*strides, window_size] if s is not None and int(s) <= window_size)
    check_stride(window_size, window_stride)
    return int(window_size), int(window_stride)


def check_stride(window_size: int, window_stride: int) -> None:
    if not 1 <= window_stride <= window_size:
        raise ValueError(
            f"window stride {window_stride} must be in 1..{window_size} (the window size; --window-stride, "
            "window_stride): a larger stride leaves pixels between windows unpredicted"
        )


def window_anchors(size: int, ws: int, stride: int) -> list[int]:
    """Window starts along one axis: {0, s, 2s, ... < size - ws} ∪ {size - ws}."""
    if stride < 1 or ws < 1:
        raise ValueError(f"window size ({ws}) and stride ({stride}) must be positive")
    if size < ws:
        raise ValueError(f"image side {size} is smaller than the window {ws}: resize it first (resize_to_window)")
    return list(range(0, size - ws, stride)) + [size - ws]


def resize_to_window(im: torch.Tensor, ws: int) -> torch.Tensor:
    """If the short side of `im` (..., H, W) is below `ws`, bilinearly resize it so the
    short side is `ws`, keeping the aspect ratio (long side truncated with `int`)."""
    h, w = im.shape[-2:]
    if min(h, w) >= ws:
        return im
    # Same arithmetic as the reference, so the truncated long side matches it exactly.
    if h < w:
        h_res, w_res = ws, (w / h) * ws
    else:
        h_res, w_res = (h / w) * ws, ws
    batched = im.unsqueeze(0) if im.dim() == 3 else im
    out = F.interpolate(batched, (int(h_res), int(w_res)), mode="bilinear", align_corners=False)
    return out[0] if im.dim() == 3 else out


def _as_chw(im: torch.Tensor) -> torch.Tensor:
    if im.dim() == 4 and im.shape[0] == 1:
        return im[0]
    if im.dim() != 3:
        raise ValueError(f"expected one image (3, H, W) or (1, 3, H, W), got shape {tuple(im.shape)}")
    return im


def _check_output(out, n: int, ws: int, n_cls: int | None) -> None:
    if isinstance(out, GridScores):
        m, p = out.masks, out.patch
        ok = m.dim() == 4 and m.shape[0] == n and m.shape[2] * p >= ws and m.shape[3] * p >= ws
        shape, expected = tuple(m.shape), f"({n}, {n_cls if n_cls is not None else 'K'}, ≥{ws}/{p}, ≥{ws}/{p})"
    else:
        ok = out.dim() == 4 and out.shape[0] == n and out.shape[-2:] == (ws, ws)
        m, shape, expected = out, tuple(out.shape), f"({n}, {n_cls if n_cls is not None else 'K'}, {ws}, {ws})"
    if not ok or (n_cls is not None and m.shape[1] != n_cls):
        raise ValueError(f"forward returned {'grid scores' if isinstance(out, GridScores) else 'logits'} of "
                         f"shape {shape}, expected {expected}")


@torch.no_grad()
def sliding_window_inference(
    forward: Forward,
    im: torch.Tensor,
    ws: int,
    stride: int,
    window_batch_size: int = 4,
    n_cls: int | None = None,
) -> torch.Tensor:
    """Logits (K, H, W) of one image (3, H, W) with H, W >= ws: windows are run in
    batches and overlapping logits averaged (sum on a canvas ÷ per-pixel count)."""
    im = _as_chw(im)
    if window_batch_size < 1:
        raise ValueError(f"window_batch_size must be >= 1, got {window_batch_size}")
    H, W = im.shape[-2:]
    rows, cols = window_anchors(H, ws, stride), window_anchors(W, ws, stride)
    boxes = [(y, x) for y in rows for x in cols]

    canvas = None
    for i in range(0, len(boxes), window_batch_size):
        batch_boxes = boxes[i : i + window_batch_size]
        windows = torch.stack([im[:, y : y + ws, x : x + ws] for y, x in batch_boxes])
        out = forward(windows, batch_boxes)
        _check_output(out, len(batch_boxes), ws, n_cls)
        if canvas is None:
            scores = out.masks if isinstance(out, GridScores) else out
            canvas = torch.zeros(scores.shape[1], H, W, dtype=torch.promote_types(scores.dtype, torch.float32),
                                 device=im.device)
        if isinstance(out, GridScores):
            for y0, y1, band in upsampled_bands(out.masks, out.patch, (ws, ws)):
                for (y, x), window_band in zip(batch_boxes, band):
                    canvas[:, y + y0 : y + y1, x : x + ws] += window_band
        else:
            for (y, x), window_logits in zip(batch_boxes, out):
                canvas[:, y : y + ws, x : x + ws] += window_logits

    # Windows form a grid, so the per-pixel count is (row count) ⊗ (column count).
    row_count = torch.zeros(H, dtype=canvas.dtype, device=im.device)
    col_count = torch.zeros(W, dtype=canvas.dtype, device=im.device)
    for y in rows:
        row_count[y : y + ws] += 1
    for x in cols:
        col_count[x : x + ws] += 1
    return canvas / (row_count[:, None] * col_count[None, :])


@torch.no_grad()
def inference_views(
    forward: Forward,
    views: Sequence[torch.Tensor],
    metas: Sequence[dict],
    ori_shape,
    ws: int,
    stride: int,
    window_batch_size: int = 4,
    n_cls: int | None = None,
) -> torch.Tensor:
    """Class probabilities (K, H, W) at `ori_shape`, averaged over the test views.

    Each view (3, h, w) or (1, 3, h, w) comes with a meta dict holding `flip`; a flipped
    view's logits are flipped back along the width before the softmax.
    """
    if len(views) == 0 or len(views) != len(metas):
        raise ValueError(f"need one meta per view and at least one view, got {len(views)} views, {len(metas)} metas")
    ori_shape = tuple(int(s) for s in ori_shape[:2])
    probs = None
    for view, meta in zip(views, metas):
        view = resize_to_window(_as_chw(view), ws)
        logits = sliding_window_inference(forward, view, ws, stride, window_batch_size, n_cls)
        logits = F.interpolate(logits[None], ori_shape, mode="bilinear", align_corners=False)[0]
        if meta.get("flip", False):
            logits = logits.flip(-1)
        p = logits.softmax(0)
        probs = p if probs is None else probs + p
    return probs / len(views)


@torch.no_grad()
def view_labels(forward: Forward, view: torch.Tensor, meta: dict, ori_shape, ws: int, stride: int,
                window_batch_size: int = 4, n_cls: int | None = None) -> torch.Tensor:
    """Labels (H, W) int64 at `ori_shape` of one test view: the argmax over classes of the
    logits `inference_views` averages (the first maximum on ties), without K × H × W logits
    where the view is one window at the image's size and `forward` returns `GridScores`.

    The probabilities' argmax equals it but where a softmax rounds two different logits to one
    probability; one view needs no probabilities."""
    ori_shape = tuple(int(s) for s in ori_shape[:2])
    view = resize_to_window(_as_chw(view), ws)
    if tuple(view.shape[-2:]) == (ws, ws) == ori_shape:
        out = forward(view[None], [(0, 0)])
        _check_output(out, 1, ws, n_cls)
        labels = labels_from_scores(out.masks, out.patch, (ws, ws))[0] if isinstance(out, GridScores) \
            else out[0].argmax(0)
    else:
        logits = sliding_window_inference(forward, view, ws, stride, window_batch_size, n_cls)
        labels = logits.argmax(0) if tuple(logits.shape[-2:]) == ori_shape else resized_labels(logits, ori_shape)
    return labels.flip(-1) if meta.get("flip", False) else labels


def views_labels(forward: Forward, views: Sequence[torch.Tensor], metas: Sequence[dict], ori_shape, ws: int,
                 stride: int, window_batch_size: int = 4, n_cls: int | None = None) -> torch.Tensor:
    """Labels (H, W) int64 at `ori_shape` of one image's test views: of one view by `view_labels`
    (no full-resolution logits where it can), of several the argmax of `inference_views`' mean
    probabilities."""
    if len(views) == 1 and len(metas) == 1:
        return view_labels(forward, views[0], metas[0], ori_shape, ws, stride, window_batch_size, n_cls)
    return inference_views(forward, views, metas, ori_shape, ws, stride, window_batch_size, n_cls).argmax(0)
