"""The benchmark's input batches: random images, or a dataset's images through its test pipeline."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from segm.bench.settings import BenchConfig, parse_inputs


def make_batches(cfg: BenchConfig, crop: tuple[int, int], normalization: str, device) -> list[torch.Tensor]:
    """`num_batches` batches of distinct images (unless `same_image`), on the device."""
    b, nb = cfg.batch_size, cfg.num_batches
    per_batch = 1 if cfg.same_image else b
    spec = parse_inputs(cfg.inputs)
    if spec is None:
        g = torch.Generator().manual_seed(cfg.seed)
        ims = torch.rand(nb * per_batch, 3, *crop, generator=g) * 2 - 1  # normalised range
    else:
        ims = load_images(spec[0], spec[1], nb * per_batch, crop, normalization, cfg.data_root)
    ims = ims.view(nb, per_batch, 3, *crop)
    if cfg.same_image:
        ims = ims.expand(nb, b, 3, *crop)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return [x.to(device).contiguous(memory_format=fmt) for x in ims]


def load_images(name: str, split: str, count: int, crop: tuple[int, int], normalization: str,
                data_root=None) -> torch.Tensor:
    """`count` validation images through the dataset's test pipeline (normalised), resized to
    crop×crop (bilinear, aspect ignored, as the lab protocol). Images are spread evenly over
    the split; a split smaller than `count` is cycled."""
    from segm.data import build_dataset

    ds = build_dataset(name, split, im_size=crop[0], crop_size=crop[0], normalization=normalization,
                       data_root=data_root)
    idx = [(i * len(ds)) // count for i in range(count)] if count <= len(ds) else [i % len(ds) for i in range(count)]
    out = torch.empty(count, 3, *crop)
    for j, i in enumerate(idx):
        im = ds[i]["im"][0].unsqueeze(0).float()
        out[j] = F.interpolate(im, size=crop, mode="bilinear", align_corners=False)[0]
    return out
