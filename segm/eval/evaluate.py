"""Dataset evaluation with sliding windows (docs/DESIGN.md, "Evaluation"), shared by
`segm.eval.miou` and the in-training evaluation.

Per image: every test view goes through `inference_views` (resize-up guard, ws×ws windows,
logit averaging, resize to the original shape, un-flip, softmax, mean over views); the
argmax at the original resolution is scored against the original-size label. Per-class
areas are accumulated over the dataset and summed over processes at the end.

Under a `DistributedSampler` the padding items it adds to even out the ranks are skipped, so
every image is scored exactly once (the reference deduplicated by file name). A DDP-wrapped
model is unwrapped first: ranks run different numbers of forwards, and DDP's per-forward
buffer broadcast would then hang.
"""
from __future__ import annotations

import itertools
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from segm.data.io import read_image
from segm.eval.window import GridScores, check_stride, inference_views, resize_to_window, view_labels, views_labels
from segm.metrics import IoUAccumulator
from segm.utils.amp import AMP_DTYPES as _AMP
from segm.utils.amp import autocast
from segm.utils.distributed import all_reduce_sum, is_main_process
from segm.visualize import blend_images, colorize, save_png

__all__ = ["AMP_DTYPES", "SAVE_FORMATS", "evaluate_dataset", "predict_labels", "predict_views", "make_window_forward"]

AMP_DTYPES = {"none": None, **dict(sorted(_AMP.items()))}  # --amp-dtype / --amp
# Saved predictions: colours blended with the input (with input and gt), or the dataset's label values.
SAVE_FORMATS = ("overlay", "index")


def _unwrap(model):
    """The bare model behind DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def make_window_forward(model, amp_dtype=None, label_view: torch.Tensor | None = None, on_map=None):
    """`forward(windows, boxes)` for `inference_views` and `view_labels`: `GridScores` of a
    Segmenter (its class scores before upsampling, `Segmenter.forward_scores`), else float32
    logits (n, K, ws, ws) (an ONNX Runtime session).

    `label_view` (h, w) long, the label at the view's (guarded) size and orientation, is cut
    like the windows and passed as `seg_gt` (oracle policy). `on_map(boxes)`, when given, says
    whether a batch's token map is wanted; if so it is then called as `on_map(boxes, token_map)`.
    """
    scores = getattr(_unwrap(model), "forward_scores", None)

    def forward(windows: torch.Tensor, boxes: list):
        seg_gt = None
        if label_view is not None:
            ws = windows.shape[-1]
            seg_gt = torch.stack([label_view[y : y + ws, x : x + ws] for y, x in boxes])
        args = (windows,) if seg_gt is None else (windows, seg_gt)  # an ONNX session takes images only
        wanted = on_map is not None and on_map(boxes)
        with autocast(windows.device.type, amp_dtype):
            if scores is not None:
                masks, tmap = scores(*args)
                out = GridScores(masks, _unwrap(model).patch_size)
            elif wanted:
                res = model.forward_all(*args)
                tmap, out = res.token_map, res.logits.float()
            else:
                return model(*args).float()
        if wanted:
            on_map(boxes, tmap)
        return out

    return forward


def _label_for_view(label: torch.Tensor, view_shape, flip: bool) -> torch.Tensor:
    """The original-size label resized (nearest) to a view and flipped like it."""
    h, w = view_shape
    if tuple(label.shape) != (h, w):
        label = F.interpolate(label[None, None].float(), (h, w), mode="nearest")[0, 0].long()
    return label.flip(-1) if flip else label


def _oracle_view(model, view, meta: dict, label, window_size: int, amp_dtype):
    """(the view guarded up to the window, its window forward) for the oracle policy: the
    original-size `label` resized and flipped like the view, cut like its windows."""
    if label is None:
        raise ValueError("the oracle policy needs the ground-truth label of each image")
    view = resize_to_window(view[0] if view.dim() == 4 else view, window_size)
    lab = _label_for_view(label.to(view.device), view.shape[-2:], bool(meta.get("flip", False)))
    return view, make_window_forward(model, amp_dtype, label_view=lab)


def predict_views(model, views, metas, ori_shape, *, window_size, window_stride, window_batch_size=4,
                  n_cls=None, amp_dtype=None, label=None) -> torch.Tensor:
    """Class probabilities (K, H, W) at `ori_shape` of one image's test views.

    For the oracle policy, `label` (H, W) is the original-size ground truth; each view then
    runs alone so its windows can be paired with the label cut the same way.
    """
    if not _unwrap(model).needs_labels:
        forward = make_window_forward(model, amp_dtype)
        return inference_views(forward, views, metas, ori_shape, window_size, window_stride,
                               window_batch_size, n_cls)
    probs = None
    for view, meta in zip(views, metas):
        view, forward = _oracle_view(model, view, meta, label, window_size, amp_dtype)
        p = inference_views(forward, [view], [meta], ori_shape, window_size, window_stride,
                            window_batch_size, n_cls)
        probs = p if probs is None else probs + p
    return probs / len(views)


def predict_labels(model, views, metas, ori_shape, *, window_size, window_stride, window_batch_size=4,
                   n_cls=None, amp_dtype=None, label=None) -> torch.Tensor:
    """Labels (H, W) int64 at `ori_shape` of one image's test views (`views_labels`); for the
    oracle policy each view's windows are paired with `label` cut the same way."""
    if not _unwrap(model).needs_labels:
        return views_labels(make_window_forward(model, amp_dtype), views, metas, ori_shape, window_size,
                            window_stride, window_batch_size, n_cls)
    if len(views) > 1:
        return predict_views(model, views, metas, ori_shape, window_size=window_size, window_stride=window_stride,
                             window_batch_size=window_batch_size, n_cls=n_cls, amp_dtype=amp_dtype,
                             label=label).argmax(0)
    view, forward = _oracle_view(model, views[0], metas[0], label, window_size, amp_dtype)
    return view_labels(forward, view, metas[0], ori_shape, window_size, window_stride, window_batch_size, n_cls)


def _real_items_on_rank(loader) -> int:
    """How many of this rank's items are not DistributedSampler padding."""
    sampler = getattr(loader, "sampler", None)
    n = len(loader.dataset)
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        # Rank r gets positions r, r + world, ... of the padded index list; positions >= n are
        # the repeated padding (with or without shuffling).
        return max(0, min(len(sampler), math.ceil((n - sampler.rank) / sampler.num_replicas)))
    return len(loader)


def _as_item(batch: dict):
    """Tolerate a default-collated batch of size 1 besides `val_collate` items."""
    label = batch.get("segmentation")
    if label is not None and label.dim() == 3:
        label = label[0]
    name = batch.get("ori_filename")
    if isinstance(name, (list, tuple)):
        name = name[0]
    return batch["im"], batch["im_metas"], label, name


# ----------------------------------------------------------------------------- images
def _original_image(meta: dict, view: torch.Tensor, ori_shape) -> np.ndarray:
    """The input image (H, W, 3) uint8: read from disk, else the de-normalised first view."""
    filename = meta.get("filename")
    if filename and os.path.isfile(filename):
        return read_image(filename)
    cfg = meta.get("img_norm_cfg") or {"mean": [0.0] * 3, "std": [1.0] * 3}
    view = view[0] if view.dim() == 4 else view
    mean = torch.tensor(cfg["mean"], dtype=torch.float32, device=view.device)[:, None, None]
    std = torch.tensor(cfg["std"], dtype=torch.float32, device=view.device)[:, None, None]
    im = F.interpolate((view.float() * std + mean)[None], ori_shape, mode="bilinear", align_corners=False)[0]
    return im.clamp(0, 255).round().byte().permute(1, 2, 0).cpu().numpy()


def _save_triplet(save_dir: Path, name: str, image, pred, label, palette, blend: bool) -> None:
    rel = Path(name).with_suffix(".png")
    pred_rgb = colorize(pred, palette)
    gt_rgb = colorize(label, palette) if label is not None else None
    if blend:
        pred_rgb = blend_images(image, pred_rgb)
        gt_rgb = blend_images(image, gt_rgb) if gt_rgb is not None else None
    save_png(image, save_dir / "input" / rel)
    save_png(pred_rgb, save_dir / "pred" / rel)
    if gt_rgb is not None:
        save_png(gt_rgb, save_dir / "gt" / rel)


def _image_saver(save_dir, save_format: str, palette, blend: bool, dataset):
    """`save(name, metas, views, ori_shape, pred, label)` writing one image's files: the
    overlay triplet, or `pred/<name>.png` alone as an index map in the label space of the
    loader's `dataset` (named by its `info`; test-server files, `segm.data.label_space`)."""
    if save_format not in SAVE_FORMATS:
        raise ValueError(f"save_format must be one of {', '.join(SAVE_FORMATS)}, got {save_format!r}")
    info = getattr(dataset, "info", None)
    if save_format == "index":
        from segm.data.label_space import to_label_space

        if info is None:
            raise ValueError("saving index maps needs the loader's dataset info (its label space)")

        def save(name, metas, views, ori_shape, pred, label):
            save_png(to_label_space(pred, info.name), save_dir / "pred" / Path(name).with_suffix(".png"))

        return save
    if palette is None:
        if info is None:
            raise ValueError("saving images needs a palette: pass palette=[(r, g, b), ...]")
        palette = info.palette

    def save(name, metas, views, ori_shape, pred, label):
        image = _original_image(metas[0], views[0], ori_shape)
        _save_triplet(save_dir, name, image, pred.cpu().numpy(), label.cpu().numpy(), palette, blend)

    return save


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()  # not inference_mode: the training loop reuses the model afterwards
def evaluate_dataset(
    model,
    loader,
    *,
    n_cls: int,
    window_size: int,
    window_stride: int,
    window_batch_size: int = 4,
    device,
    amp_dtype=None,
    frac_dataset: float = 1.0,
    progress: bool = True,
    save_dir=None,
    palette=None,
    blend: bool = True,
    save_format: str = "overlay",
) -> dict:
    """Scores a model on a val loader (batch size 1, `val_collate` items, possibly a
    DistributedSampler). The model must already be on `device`; it is put in eval mode
    and left there.

    Returns {pixel_accuracy, mean_accuracy, mean_iou, cat_iou and cat_acc (lists, % per class),
    inference_time (seconds, this rank), num_images (scored, all ranks)}, identical on
    every rank. `frac_dataset` in (0, 1] evaluates the first ceil(frac·len(loader)) items
    of each rank. With `save_dir`, writes `{input,pred,gt}/<name>.png` coloured with
    `palette` (default: the dataset's), blended 50/50 with the input when `blend`; with
    `save_format="index"`, only `pred/<name>.png`, 8-bit index maps in the dataset's label space.
    """
    if not 0.0 < frac_dataset <= 1.0:
        raise ValueError(f"frac_dataset must be in (0, 1], got {frac_dataset}")
    check_stride(window_size, window_stride)
    device = torch.device(device)
    model = getattr(model, "module", model)  # DDP / DataParallel: forward the bare module
    model.eval()
    save = None if save_dir is None else _image_saver(Path(save_dir), save_format, palette, blend, loader.dataset)

    n_items = min(_real_items_on_rank(loader), math.ceil(len(loader) * frac_dataset))
    acc = IoUAccumulator(n_cls, device=device)
    n_scored = torch.zeros((), dtype=torch.int64, device=device)
    main = is_main_process()
    start = time.perf_counter()
    bar = tqdm(total=n_items, desc="eval", disable=not (progress and main), dynamic_ncols=True)
    for batch in itertools.islice(loader, n_items):
        views, metas, label, name = _as_item(batch)
        if label is None:
            raise ValueError(f"image {name} has no ground-truth label: evaluation needs a labelled split")
        ori_shape = tuple(int(s) for s in metas[0]["ori_shape"][:2])
        views = [v.to(device, non_blocking=True) for v in views]
        label = label.to(device, non_blocking=True)
        pred = predict_labels(
            model, views, metas, ori_shape, window_size=window_size, window_stride=window_stride,
            window_batch_size=window_batch_size, n_cls=n_cls, amp_dtype=amp_dtype, label=label,
        )
        acc.update(pred, label)
        n_scored += 1
        if save is not None:
            save(name, metas, views, ori_shape, pred, label)
        bar.update(1)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start

    acc.all_reduce()
    all_reduce_sum(n_scored)
    scores = acc.compute()
    scores["inference_time"] = round(elapsed, 3)
    scores["num_images"] = int(n_scored.item())
    return scores
