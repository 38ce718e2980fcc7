"""Labels without full-resolution logits (docs/DESIGN.md, "The label path").

A Segmenter's logits are its class scores on the patch grid, bilinearly upsampled ×P. Who wants
labels keeps one integer per pixel, so `labels_from_scores` upsamples and takes the argmax one
band of rows at a time: peak memory is a band of K × rows × W floats, not K × H × W.

The bands are exact, not approximate: with an integer factor P, output row i reads grid rows
around (i + 0.5)/P − 0.5, a value float arithmetic holds exactly. A band of grid rows
[r0, r1 + 1) upsampled on its own (scale 1/P, exact as well) gives output rows [P·r0 + P/2,
P·r1 + P/2) bit for bit as the whole map does: the same source rows, weights and sums. The first
band starts at row 0 and the last ends at the border, where both clamp alike. Ties go to the lower
class index, as `torch.argmax` on the full logits.

`resized_labels` does the same for the arbitrary-ratio resize of a canvas of logits back to an
image's size (evaluation's last step), in chunks of classes instead: any two classes are
interpolated independently, so a chunk of channels is exact, and a running maximum keeps the first
best class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from segm.utils.host_memory import MMAP_THRESHOLD_MAX

__all__ = ["BAND_BYTES", "CLASS_CHUNK", "band_rows_for", "label_bands", "labels_from_scores", "resized_labels",
           "upsampled_bands"]

# The bands' buffer stays under glibc's largest mmap threshold (32 MiB on 64-bit Linux): above
# it the buffer would be fresh pages faulted in on every call, below it the heap reuses it and it
# stays warm in cache (2 × 150 classes × 512 px: bands of 2 grid rows; the labels in 60 ms against
# 120 ms for the whole upsampling and its argmax, BENCHMARKS.md "Fast where it runs").
BAND_BYTES = MMAP_THRESHOLD_MAX * 15 // 16
# Classes per chunk of `resized_labels`.
CLASS_CHUNK = 16


def band_rows_for(masks: torch.Tensor, patch: int, images: int | None = None) -> int:
    """Grid rows per band: as many as keep a band (one grid row more, the overlap) of `images`
    images (default: the batch) within BAND_BYTES, at least one."""
    b, k, _, gw = masks.shape
    per_row = (b if images is None else images) * k * patch * gw * patch * masks.element_size()
    return max(1, BAND_BYTES // per_row - 1)


def label_bands(grid_rows: int, patch: int, band_rows: int) -> list[tuple[int, int, int, int]]:
    """(g0, g1, y0, y1) per band: grid rows [g0, g1) upsampled give output rows [y0, y1) of the
    whole map at offset y0 − P·g0 of the band's own upsampling."""
    if band_rows < 1:
        raise ValueError(f"band_rows must be ≥ 1, got {band_rows}")
    cuts = list(range(band_rows, grid_rows, band_rows))  # grid rows where a band ends
    starts, ends = [0, *(patch * c + patch // 2 for c in cuts)], [*(patch * c + patch // 2 for c in cuts),
                                                                    patch * grid_rows]
    bands = []
    for k, (y0, y1) in enumerate(zip(starts, ends)):
        g0 = cuts[k - 1] if k else 0
        g1 = min(grid_rows, cuts[k] + 1) if k < len(cuts) else grid_rows
        bands.append((g0, g1, y0, y1))
    return bands


def upsampled_bands(masks: torch.Tensor, patch: int, size: tuple[int, int] | None = None,
                    band_rows: int | None = None):
    """Yields (y0, y1, logits) with logits (B, K, y1 − y0, w) equal, bit for bit, to rows
    [y0, y1) of `F.interpolate(masks, scale ×patch, bilinear)[..., :h, :w]`, covering [0, h).

    masks (B, K, Gh, Gw): class scores on the patch grid, in their own dtype (upsampled in it, as
    the full path does). Odd `patch` sizes have no exact band boundary: one band, the whole map.
    The bands share one buffer: each is valid until the next is asked for."""
    _, _, gh, gw = masks.shape
    h, w = size if size is not None else (gh * patch, gw * patch)
    band_rows = band_rows_for(masks, patch) if band_rows is None else band_rows
    if patch % 2 or band_rows >= gh:
        bands, rows = [(0, gh, 0, gh * patch)], gh
    else:
        bands, rows = label_bands(gh, patch, band_rows), band_rows + 1
    # A band is laid out as the whole map is, so that the same kernel (same arithmetic) upsamples it.
    fmt = torch.channels_last if masks.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    # Every band upsamples `rows` grid rows (the last one reaches back as far as it needs), so one
    # buffer serves them all: written in place, its pages are faulted in once per call.
    reuse = not (masks.requires_grad or torch.compiler.is_exporting() or torch.compiler.is_compiling())
    buf = None
    for g0, g1, y0, y1 in bands:
        if y0 >= h:
            return
        start = min(g0, gh - rows)
        src = masks[:, :, start : start + rows].contiguous(memory_format=fmt)
        out_size = (rows * patch, gw * patch)
        if reuse:
            if buf is None:
                buf = torch.empty((*src.shape[:2], *out_size), dtype=src.dtype, device=src.device, memory_format=fmt)
            part = torch.ops.aten.upsample_bilinear2d.out(src, out_size, False, out=buf)
        else:
            part = F.interpolate(src, size=out_size, mode="bilinear", align_corners=False)
        top = y0 - patch * start
        y1 = min(y1, h)
        band = part[:, :, top : top + y1 - y0, :w]
        del part
        yield y0, y1, band
        del band


def labels_from_scores(masks: torch.Tensor, patch: int, size: tuple[int, int] | None = None,
                       band_rows: int | None = None) -> torch.Tensor:
    """(B, h, w) int64: argmax over classes of the upsampled `masks` cropped to `size` (default:
    the whole map), one band of rows at a time (`upsampled_bands`)."""
    labels = []
    for _, _, band in upsampled_bands(masks, patch, size, band_rows):
        labels.append(band.argmax(1))
        del band  # a fresh band (grad, export) is freed before the next one is computed
    return labels[0] if len(labels) == 1 else torch.cat(labels, 1)


def resized_labels(logits: torch.Tensor, size: tuple[int, int], chunk: int = CLASS_CHUNK) -> torch.Tensor:
    """(h, w) int64: argmax over classes of `F.interpolate(logits[None], size, bilinear)[0]` for
    logits (K, H, W), resized `chunk` classes at a time (peak: chunk × h × w floats)."""
    k = logits.shape[0]
    best = index = None
    for c0 in range(0, k, chunk):
        part = F.interpolate(logits[None, c0 : c0 + chunk], size, mode="bilinear", align_corners=False)[0]
        value, arg = part.max(0)
        if best is None:
            best, index = value, arg
            continue
        better = value > best  # strictly: an equal later class does not win (first maximum)
        best = torch.where(better, value, best)
        index = torch.where(better, arg + c0, index)
    return index
