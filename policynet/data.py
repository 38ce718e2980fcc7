"""Per-dataset inputs of the policy network (docs/DESIGN.md, "Training recipe").

Items are `(image, label, path)` (the reference's `torchvision.io.read_image` RGB; read here with
segm's checked readers): image float (3, s, s) normalised as (x − 127.5)/127.5 *before*
any resize or crop, label long (s, s) in the segmenter's train label space (ignore 255). The policy
labels themselves are derived on the batch, on the device (`segm.data.policy_labels`).

Geometry per dataset:
- ade20k: image (bilinear) and label (nearest) resized to 512×512, aspect ignored;
- cityscapes: one 768×768 crop at full resolution;
- pcontext: short side → 512, then one 480×480 crop;
- synthetic / custom: short side → the dataset's `im_size`, then one crop×crop crop (both from
  `configs/config.yml`): the scale at which the segmenter sees its windows.
Training crops are random and flipped with p = 0.5; validation crops are centred and never
flipped (the reference drew random crops in validation too; docs/DESIGN.md, "Deviations from
the reference").

Randomness is per item: the sampler hands each index its own seed, so an item's augmentation
depends only on (seed, epoch, position), whatever the worker count, and a resumed run draws
exactly the batches the uninterrupted run would have drawn.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from segm.config import load_config
from segm.data.base import canonical_name, dataset_info
from segm.data.io import check_same_size, read_image, read_label
from segm.data.layout import dataset_root, pair_files, split_layout


@dataclass(frozen=True)
class Geometry:
    """`resize`: both sides → `size` (aspect ignored); `crop`: a size×size crop at full resolution;
    `short_side`: short side → `short_side`, then a size×size crop."""

    mode: str
    size: int
    short_side: int | None = None


# The largest --crop-size (synthetic, custom): 4× the area of Cityscapes' 768, the largest reference crop.
MAX_CROP_SIZE = 1536


def default_crop_size(name: str) -> int:
    return int(load_config()["dataset"][canonical_name(name)]["crop_size"])


def geometry_for(name: str, crop_size: int | None = None) -> Geometry:
    """The reference geometry; `crop_size` may change it only for synthetic/custom."""
    name = canonical_name(name)
    fixed = {
        "ade20k": Geometry("resize", 512),
        "cityscapes": Geometry("crop", 768),
        "pascal_context": Geometry("short_side", 480, short_side=512),
    }
    if name in fixed:
        if crop_size is not None and crop_size != fixed[name].size:
            raise ValueError(
                f"--crop-size applies to synthetic and custom only; {name} uses {fixed[name].size}"
            )
        return fixed[name]
    size = default_crop_size(name) if crop_size is None else int(crop_size)
    if size <= 0 or size % 32:
        raise ValueError(f"crop size must be a positive multiple of 32 (the superpatch size), got {size}")
    if size > MAX_CROP_SIZE:
        raise ValueError(f"--crop-size {size} is above {MAX_CROP_SIZE}, the largest crop the policy network takes here "
                         "(the reference's are 480-768; its memory grows with the crop's area)")
    im_size = int(load_config()["dataset"][name]["im_size"])
    return Geometry("short_side", size, short_side=max(size, im_size))


def list_files(name: str, split: str, root: Path) -> list[tuple[Path, Path]]:
    """(image, label) paths of a labelled split (`segm.data.layout`); raises if it is missing or empty."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; choose train or val")
    layout = split_layout(name, root, split)
    pairs = [(layout.img_dir / image, layout.ann_dir / label) for image, label in pair_files(layout)]
    if not pairs:
        raise FileNotFoundError(f"no {split} images found for {canonical_name(name)} under {root}")
    return pairs


def _read_image(path: Path) -> torch.Tensor:
    """uint8 (3, H, W) RGB, by segm's one image reader."""
    return torch.from_numpy(read_image(str(path))).permute(2, 0, 1)


def _resize_short_side(h: int, w: int, short: int) -> tuple[int, int]:
    # torchvision.transforms.Resize(int): the long side is truncated, not rounded.
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


class PolicyDataset(Dataset):
    """Images and train-label-space maps of one split.

    `dataset[i]` gives the deterministic (validation) view; `dataset[(i, seed)]` a random one
    (crop position and flip drawn from `seed`) when `train=True`.
    """

    def __init__(self, name: str, split: str, *, data_root=None, classes_file=None,
                 crop_size: int | None = None, train: bool = False, hflip: bool = True):
        self.name = canonical_name(name)
        self.split = split
        self.root = dataset_root(self.name, data_root)  # $DATASET unset: a ValueError (a usage error)
        self.geometry = geometry_for(self.name, crop_size)
        self.files = list_files(self.name, split, self.root)
        self.info = dataset_info(self.name, data_root=self.root, classes_file=classes_file)
        self.train = train
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.files)

    def _read_label(self, path: Path) -> torch.Tensor:
        info = self.info  # train label space: ADE 0 → 255 and others − 1, file ignore value → 255
        label = read_label(str(path), info.n_cls, reduce_zero_label=info.reduce_zero_label,
                           ignore_value=info.label_ignore_value)
        return torch.from_numpy(label).long()

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        rng = np.random.default_rng(seed) if (self.train and seed is not None) else None
        im_path, label_path = self.files[index]
        im = (_read_image(im_path).float() - 127.5) / 127.5
        label = self._read_label(label_path)
        check_same_size(im_path, im.shape[-2:], label_path, label.shape)
        im, label = self._geometry(im, label, rng, im_path)
        if rng is not None and self.hflip and rng.random() < 0.5:
            im, label = im.flip(-1), label.flip(-1)
        return im.contiguous(), label.contiguous(), str(im_path)

    def _geometry(self, im, label, rng, path):
        g = self.geometry
        if g.mode == "resize":
            return _resize(im, label, (g.size, g.size))
        if g.mode == "short_side":
            im, label = _resize(im, label, _resize_short_side(*label.shape, g.short_side))
        h, w = label.shape
        if h < g.size or w < g.size:
            raise ValueError(f"image {path} ({h}×{w}) is smaller than the {g.size}×{g.size} crop")
        if rng is None:
            top, left = (h - g.size) // 2, (w - g.size) // 2
        else:
            top, left = int(rng.integers(0, h - g.size + 1)), int(rng.integers(0, w - g.size + 1))
        return im[:, top:top + g.size, left:left + g.size], label[top:top + g.size, left:left + g.size]


def _resize(im, label, size):
    if tuple(label.shape) == tuple(size):
        return im, label
    im = F.interpolate(im[None], size=size, mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return im, label


class TrainBatchSampler(Sampler):
    """Shuffled batches of `(index, augmentation seed)` with drop_last, from a given iteration on.

    Epoch e uses the permutation and seeds of `np.random.default_rng([seed, e])`, so batch i is
    a pure function of (seed, i, dataset size, batch size): resuming needs only the iteration.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int):
        if n < batch_size:
            raise ValueError(f"the training split has {n} images, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop = start, stop
        self.per_epoch = n // batch_size

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self):
        epoch, cached = None, None
        for it in range(self.start, self.stop):
            e, pos = divmod(it, self.per_epoch)
            if e != epoch:
                rng = np.random.default_rng([self.seed, e])
                cached = (rng.permutation(self.n), rng.integers(0, 2**63 - 1, size=self.n))
                epoch = e
            perm, seeds = cached
            sl = slice(pos * self.batch_size, (pos + 1) * self.batch_size)
            yield [(int(i), int(s)) for i, s in zip(perm[sl], seeds[sl])]


def eval_subset(n: int, count: int) -> list[int]:
    """`count` evenly spread indices of a split of size `n` (all of them if count ≥ n)."""
    if count >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, count).round().astype(int).tolist()))
