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

Most of a trained model's cells need no upsampling at all. Between four neighbouring grid points
every upsampled score is a convex combination of that class's four scores, so a class whose lowest
score there beats every other class's highest (by a margin that covers any order of float
rounding) wins every pixel of the cell. `dominant_cells` finds those cells on the grid;
`labels_from_scores` upsamples only the bands that hold another pixel and takes the argmax only
at those pixels. Where nothing can be proven (non-finite scores, a patch that is not a power of
two) or it would not pay (the GPU, an exported graph, few classes, a small grid, an untrained
model's scores) every pixel takes the plain path. Either way the labels are the same.

`resized_labels` does the same for the arbitrary-ratio resize of a canvas of logits back to an
image's size (evaluation's last step), in chunks of classes instead: any two classes are
interpolated independently, so a chunk of channels is exact, and a running maximum keeps the first
best class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from segm.utils.host_memory import MMAP_THRESHOLD_MAX

__all__ = ["BAND_BYTES", "CLASS_CHUNK", "SHORTCUT_MIN_CELLS", "SHORTCUT_MIN_CLASSES", "UNIFORM_MARGIN_EPS",
           "band_rows_for", "cell_of", "dominant_cells", "label_bands", "labels_from_scores", "resized_labels",
           "upsampled_bands"]

# The bands' buffer stays under glibc's largest mmap threshold (32 MiB on 64-bit Linux): above
# it the buffer would be fresh pages faulted in on every call, below it the heap reuses it and it
# stays warm in cache (2 × 150 classes × 512 px: bands of 2 grid rows; the labels in 60 ms against
# 120 ms for the whole upsampling and its argmax, BENCHMARKS.md "Fast where it runs").
BAND_BYTES = MMAP_THRESHOLD_MAX * 15 // 16
# Classes per chunk of `resized_labels`.
CLASS_CHUNK = 16
# A cell's winner must beat every other class by this many machine epsilons of the largest score
# (|score| ≤ M): an upsampled value lies within a few eps·M of its convex combination whatever
# order the kernel adds in, and rounding to the scores' dtype moves it by eps·M/2 at most.
UNIFORM_MARGIN_EPS = 16
# A band whose open pixels are fewer than 1/GATHER_BELOW of it compares only theirs (copied out);
# a band with more compares every pixel.
GATHER_BELOW = 2
GATHER_CHUNKS = 8  # and copies them an eighth of the band at a time
# With fewer classes or a smaller grid the argmax costs less than finding what it may skip
# (measured, BENCHMARKS.md "The label path").
SHORTCUT_MIN_CLASSES = 32
SHORTCUT_MIN_CELLS = 256
# Fewer cells claimed than 1/CLAIMED_AT_LEAST of them (an untrained model's scores): the plain path.
CLAIMED_AT_LEAST = 20


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
                    band_rows: int | None = None, wanted=None):
    """Yields (y0, y1, logits) with logits (B, K, y1 − y0, w) equal, bit for bit, to rows
    [y0, y1) of `F.interpolate(masks, scale ×patch, bilinear)[..., :h, :w]`, covering [0, h).

    masks (B, K, Gh, Gw): class scores on the patch grid, in their own dtype (upsampled in it, as
    the full path does). Odd `patch` sizes have no exact band boundary: one band, the whole map.
    The bands share one buffer: each is valid until the next is asked for. With `wanted(y0, y1)`
    false a band is not computed: its logits are None."""
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
        y1 = min(y1, h)
        if wanted is not None and not wanted(y0, y1):
            yield y0, y1, None
            continue
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
        band = part[:, :, top : top + y1 - y0, :w]
        del part
        yield y0, y1, band
        del band


def cell_of(coords: torch.Tensor, patch: int) -> torch.Tensor:
    """The cell (of the grid padded by one) of each output coordinate: the grid points it is
    interpolated from are cell − 1 and cell, clamped to the grid. Output coordinate y reads
    from (y + 0.5)/P − 0.5 (clamped at 0, exact for P a power of two), so its cell is
    ⌊(y + 0.5)/P + 0.5⌋ = ⌊(2y + 1 + P) / 2P⌋."""
    return torch.div(2 * coords + 1 + patch, 2 * patch, rounding_mode="floor")


def dominant_cells(masks: torch.Tensor, patch: int) -> torch.Tensor | None:
    """(B, Gh + 1, Gw + 1) int64: for each cell of the grid padded by one at every border (see
    `cell_of`), the class that wins every pixel interpolated from its four grid points, −1 where
    none is certain. None where nothing can be proven: a patch that is not a power of two (the
    source coordinates are then rounded) or scores that are not all finite."""
    if patch & (patch - 1) or not bool(torch.isfinite(masks).all()):
        return None
    x = F.pad(masks.float(), (1, 1, 1, 1), mode="replicate")  # the border's clamped reads
    high = F.max_pool2d(x, 2, 1)  # (B, K, Gh + 1, Gw + 1): each class's extremes over a cell's corners
    low = -F.max_pool2d(-x, 2, 1)
    best_low, winner = low.max(1)
    others = high.scatter(1, winner[:, None], float("-inf")).amax(1)
    margin = UNIFORM_MARGIN_EPS * torch.finfo(masks.dtype).eps * x.abs().amax()
    return torch.where(others < best_low - margin, winner, -1)


def labels_from_scores(masks: torch.Tensor, patch: int, size: tuple[int, int] | None = None,
                       band_rows: int | None = None) -> torch.Tensor:
    """(B, h, w) int64: argmax over classes of the upsampled `masks` cropped to `size` (default:
    the whole map), one band of rows at a time (`upsampled_bands`); on the CPU only the bands and
    pixels that `dominant_cells` leaves open are upsampled and compared."""
    gh, gw = masks.shape[2:]
    h, w = size if size is not None else (gh * patch, gw * patch)
    dominant = None
    if masks.device.type == "cpu" and masks.shape[1] >= SHORTCUT_MIN_CLASSES and gh * gw >= SHORTCUT_MIN_CELLS \
            and not (torch.compiler.is_exporting() or torch.compiler.is_compiling()):
        masks = masks.detach()  # labels carry no gradient
        dominant = dominant_cells(masks, patch)
    if dominant is None:
        return _plain_labels(masks, patch, size, band_rows)
    claimed = dominant >= 0
    if int(claimed.sum()) * CLAIMED_AT_LEAST < claimed.numel():  # e.g. an untrained model: nothing to skip
        return _plain_labels(masks, patch, size, band_rows)
    out = dominant[:, cell_of(torch.arange(h), patch)][:, :, cell_of(torch.arange(w), patch)]
    open_ = out < 0
    open_rows = open_.any(2).any(0).tolist()
    for y0, y1, band in upsampled_bands(masks, patch, size, band_rows, wanted=lambda a, b: any(open_rows[a:b])):
        if band is not None:
            _open_labels(band, out[:, y0:y1], open_[:, y0:y1])
        del band
    return out


def _plain_labels(masks, patch, size, band_rows):
    labels = []
    for _, _, band in upsampled_bands(masks, patch, size, band_rows):
        labels.append(band.argmax(1))
        del band  # a fresh band (grad, export) is freed before the next one is computed
    return labels[0] if len(labels) == 1 else torch.cat(labels, 1)


def _open_labels(band: torch.Tensor, out: torch.Tensor, todo: torch.Tensor) -> None:
    """Writes into `out` (B, h, w) the argmax of `band` (B, K, h, w) where `todo` is true."""
    k = band.shape[1]
    sb, _, sh, sw = band.stride()
    # channels-last: every pixel's scores are one row of K in the band's storage, pixel (b, y, x)
    # at row (b·sb + y·sh + x·sw) / K
    rows_view = band.stride(1) == 1 and sw == k and sh % k == 0 and sb % k == 0
    if int(todo.sum()) * GATHER_BELOW >= todo.numel() or not rows_view:
        torch.where(todo, band.argmax(1), out, out=out)
        return
    b, y, x = todo.nonzero(as_tuple=True)
    pixel = (b * sb + y * sh + x * sw) // k
    rows = band.as_strided((int(pixel.max()) + 1, k), (k, 1))
    labels = torch.cat([rows.index_select(0, part).argmax(-1)  # copies rows, where a mask would index elements
                        for part in pixel.split(max(1, todo.numel() // GATHER_CHUNKS))])
    out[b, y, x] = labels


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
