"""Rewrites applied to the exported program before it becomes ONNX: the same function, in
operators that ONNX Runtime runs faster on the CPU.

Bilinear upsampling (align_corners=False) is separable: out = Wh · x · Wwᵀ with constant (out, in)
weight matrices of two non-zero entries per row, PyTorch's own weights. ONNX Runtime's Resize
took 81–85 ms for the ×16 upsampling of a (2, 150, 32, 32) logit map on this project's 2-core CPU,
the two matrix products 25–28 ms; results agree within 1e-6 (float rounding of the sums).

A labels graph (`labels_as_matmuls`) runs the same two products band by band with the classes
last, so that its ArgMax reduces the innermost axis: ONNX Runtime's ArgMax over the class axis of
a (B, K, rows, W) band is about 5× slower than over the last axis of (B, rows, W, K) (25 against
4.5 ms for 2 × 150 × 64 × 512 floats, BENCHMARKS.md).
"""
from __future__ import annotations

import numpy as np
import torch


def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64: row o holds the weights bilinear resizing (align_corners=False) gives
    input samples for output o: source (o + 0.5)·n_in/n_out − 0.5, clamped at 0, between its two
    neighbours (the last repeated at the border)."""
    o = np.arange(n_out)
    src = np.maximum((o + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    lam = src - i0
    w = np.zeros((n_out, n_in))
    np.add.at(w, (o, i0), 1 - lam)
    np.add.at(w, (o, np.minimum(i0 + 1, n_in - 1)), lam)
    return w


def upsample_bilinear_as_matmul(x: torch.Tensor, output_size, align_corners: bool, scale_factors=None):
    """`aten.upsample_bilinear2d.vec` for static sizes and align_corners=False (what
    `Segmenter` calls), as two matrix products; anything else keeps the default decomposition."""
    if align_corners or output_size is None or scale_factors is not None:
        return NotImplemented
    (h, w), (oh, ow) = x.shape[-2:], output_size
    wh = torch.tensor(bilinear_weights(h, oh), dtype=x.dtype, device=x.device)
    ww = torch.tensor(bilinear_weights(w, ow).T, dtype=x.dtype, device=x.device)
    return wh @ (x @ ww)


def labels_as_matmuls(masks: torch.Tensor, patch: int, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) int64 for a graph: the argmax over classes of the ×patch bilinear upsampling of
    masks (B, K, Gh, Gw), cropped to `size` — the labels of the logits graph, whose upsampling is
    `upsample_bilinear_as_matmul`: the same two products, each sum over the same terms in the same
    order (a band leaves out only the grid rows its weights give 0). Every grid row is resized
    along x once, (B, Gh, w, K); then each band of output rows (as many as the eager label path's
    band, `band_rows_for`) is a product over the grid rows it reads and an ArgMax over the last
    axis, the lower class on ties. A graph exported for any batch sizes its bands for one image
    (the batch is symbolic then)."""
    from segm.model.labels import band_rows_for

    b, k, gh, gw = masks.shape
    h, w = size
    wh = bilinear_weights(gh, gh * patch)[:h]
    ww = torch.tensor(bilinear_weights(gw, gw * patch)[:w], dtype=masks.dtype, device=masks.device)
    cols = ww @ masks.permute(0, 2, 3, 1)  # (B, Gh, w, K)
    rows = patch * band_rows_for(masks, patch, images=b if isinstance(b, int) else 1)
    labels = []
    for y0 in range(0, h, rows):
        weights = wh[y0 : y0 + rows]
        used = np.flatnonzero(weights.any(0))
        g0, g1 = int(used[0]), int(used[-1]) + 1
        band = torch.tensor(weights[:, g0:g1], dtype=masks.dtype, device=masks.device) @ cols[:, g0:g1].reshape(
            b, g1 - g0, w * k)
        labels.append(band.reshape(b, -1, w, k).argmax(-1))
    return labels[0] if len(labels) == 1 else torch.cat(labels, 1)


DECOMPOSITIONS = {torch.ops.aten.upsample_bilinear2d.vec: upsample_bilinear_as_matmul}
