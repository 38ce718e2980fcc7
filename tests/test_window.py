import types

import pytest
import torch
import torch.nn.functional as F

from segm.eval.window import (MULTISCALE_RATIOS, inference_views, resize_to_window, resolve_window,
                              sliding_window_inference, view_plan, window_anchors)


def test_anchors_cityscapes_example():
    rows, cols = window_anchors(1024, 768, 512), window_anchors(2048, 768, 512)
    assert rows == [0, 256]
    assert cols == [0, 512, 1024, 1280]
    assert len(rows) * len(cols) == 8


@pytest.mark.parametrize(
    "size, ws, stride, expected",
    [
        (512, 512, 512, [0]),  # image exactly one window
        (531, 512, 512, [0, 19]),  # ADE val 531x512: last window flush
        (1024, 512, 512, [0, 512]),  # exact tiling: no duplicate anchor
        (700, 480, 320, [0, 220]),
        (10, 4, 3, [0, 3, 6]),
    ],
)
def test_anchors(size, ws, stride, expected):
    assert window_anchors(size, ws, stride) == expected


def test_anchors_reject_small_image():
    with pytest.raises(ValueError, match="resize"):
        window_anchors(300, 512, 512)


def test_resize_guard():
    im = torch.rand(3, 256, 384)
    out = resize_to_window(im, 512)
    assert out.shape == (3, 512, 768)
    expected = F.interpolate(im[None], (512, 768), mode="bilinear", align_corners=False)[0]
    assert torch.equal(out, expected)
    # Long side as the reference computes it: int((w / h) * ws), so (15/11)*22 =
    # 29.999999999999996 -> 29 (not round(15*22/11) = 30).
    assert resize_to_window(torch.rand(3, 11, 15), 22).shape[-2:] == (22, 29)
    assert resize_to_window(torch.rand(1, 3, 15, 11), 22).shape[-2:] == (29, 22)
    assert resize_to_window(torch.rand(3, 7, 3), 6).shape[-2:] == (14, 6)
    assert resize_to_window(torch.rand(3, 4, 4), 6).shape[-2:] == (6, 6)
    big = torch.rand(3, 512, 600)
    assert resize_to_window(big, 512) is big


def _coord_forward(n_cls):
    """Logits that depend only on the absolute pixel position (and the class)."""

    def forward(windows, boxes):
        n, _, ws, _ = windows.shape
        ys = torch.arange(ws, dtype=torch.float64)
        out = torch.empty(n, n_cls, ws, ws, dtype=torch.float64)
        for i, (y0, x0) in enumerate(boxes):
            for k in range(n_cls):
                out[i, k] = (ys[:, None] + y0) * 1000 + (ys[None, :] + x0) + 0.25 * k
        return out

    return forward


def _identity_forward(windows, boxes):
    return windows.clone()


def test_non_overlapping_windows_reassemble_exactly():
    im = torch.rand(3, 8, 12, dtype=torch.float64)
    out = sliding_window_inference(_identity_forward, im, ws=4, stride=4, window_batch_size=2, n_cls=3)
    assert torch.equal(out, im)
    out = sliding_window_inference(_coord_forward(2), im, ws=4, stride=4, window_batch_size=5, n_cls=2)
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(12.0), indexing="ij")
    expected = torch.stack([ys * 1000 + xs + 0.25 * k for k in range(2)]).double()
    assert torch.equal(out, expected)


def test_overlapping_windows_are_averaged():
    # Each window returns a constant = its index; overlapped pixels get the mean.
    H, W, ws, stride = 7, 10, 4, 2
    rows, cols = window_anchors(H, ws, stride), window_anchors(W, ws, stride)
    boxes = [(y, x) for y in rows for x in cols]
    seen = []

    def forward(windows, batch_boxes):
        seen.extend(batch_boxes)
        idx = torch.tensor([boxes.index(b) for b in batch_boxes], dtype=torch.float64)
        return idx[:, None, None, None].expand(len(batch_boxes), 1, ws, ws).clone()

    out = sliding_window_inference(forward, torch.rand(3, H, W, dtype=torch.float64), ws, stride, 3, n_cls=1)
    assert seen == boxes  # row-major order
    total = torch.zeros(H, W, dtype=torch.float64)
    count = torch.zeros(H, W, dtype=torch.float64)
    for i, (y, x) in enumerate(boxes):
        total[y : y + ws, x : x + ws] += i
        count[y : y + ws, x : x + ws] += 1
    assert torch.allclose(out[0], total / count, rtol=0, atol=1e-12)
    # Overlapping identity windows give back the image.
    im = torch.rand(3, H, W, dtype=torch.float64)
    assert torch.allclose(sliding_window_inference(_identity_forward, im, ws, stride, 2), im, atol=1e-12)


def test_window_batching_invariance_and_batch_sizes():
    im = torch.rand(1, 3, 20, 29)
    sizes = []

    def forward(windows, boxes):
        sizes.append(windows.shape[0])
        assert len(boxes) == windows.shape[0]
        return torch.cat([windows, windows.mean(1, keepdim=True) * 3], 1)

    a = sliding_window_inference(forward, im, 8, 6, window_batch_size=1, n_cls=4)
    n_windows = len(sizes)
    sizes.clear()
    b = sliding_window_inference(forward, im, 8, 6, window_batch_size=4, n_cls=4)
    assert n_windows == 3 * 5 == sum(sizes)  # rows {0, 6, 12}, cols {0, 6, 12, 18, 21}
    assert sizes == [4, 4, 4, 3]
    assert torch.equal(a, b)


def test_forward_shape_is_checked():
    with pytest.raises(ValueError, match="expected \\(1, 5, 4, 4\\)"):
        sliding_window_inference(lambda w, b: w, torch.rand(3, 4, 4), 4, 4, 1, n_cls=5)


def _reference_view(forward, view, flip, ori_shape, ws, stride):
    """Straight transcription of the reference per-view pipeline."""
    view = resize_to_window(view, ws)
    H, W = view.shape[-2:]
    rows, cols = window_anchors(H, ws, stride), window_anchors(W, ws, stride)
    logit, count = None, torch.zeros(1, H, W, dtype=torch.float64)
    for y in rows:
        for x in cols:
            out = forward(view[None, :, y : y + ws, x : x + ws], [(y, x)])[0]
            logit = torch.zeros(out.shape[0], H, W, dtype=torch.float64) if logit is None else logit
            logit[:, y : y + ws, x : x + ws] += out
            count[:, y : y + ws, x : x + ws] += 1
    logit = F.interpolate((logit / count)[None], ori_shape, mode="bilinear", align_corners=False)[0]
    if flip:
        logit = logit.flip(2)
    return logit.softmax(0)


def _conv_forward():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)

    def forward(windows, boxes):
        return F.conv2d(windows, weight, padding=1)

    return forward


def test_flip_is_undone():
    im = torch.rand(3, 10, 14, dtype=torch.float64)
    args = ((10, 14), 8, 4, 2)
    # Identity logits: a flipped view, flipped back, gives the plain view's result.
    plain = inference_views(_identity_forward, [im], [{"flip": False}], *args)
    unflipped = inference_views(_identity_forward, [im.flip(-1)], [{"flip": True}], *args)
    not_unflipped = inference_views(_identity_forward, [im.flip(-1)], [{"flip": False}], *args)
    assert torch.allclose(unflipped, plain, atol=1e-12)
    assert not torch.allclose(not_unflipped, plain)
    assert torch.allclose(plain.sum(0), torch.ones(10, 14, dtype=torch.float64))
    # A content-dependent forward matches the reference pipeline.
    forward = _conv_forward()
    flipped = inference_views(forward, [im.flip(-1)], [{"flip": True}], *args, n_cls=4)
    assert torch.allclose(flipped, _reference_view(forward, im.flip(-1), True, (10, 14), 8, 4), atol=1e-12)


def test_twelve_views_are_averaged():
    forward = _conv_forward()
    ori_shape, ws, stride = (12, 16), 8, 5
    g = torch.Generator().manual_seed(1)
    views, metas = [], []
    for ratio in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75):  # 0.5 and 0.75 go through the guard
        h, w = int(12 * ratio), int(16 * ratio)
        for flip in (False, True):
            v = torch.rand(3, h, w, generator=g, dtype=torch.float64)
            views.append(v)
            metas.append({"flip": flip, "ori_shape": ori_shape})
    out = inference_views(forward, views, metas, ori_shape, ws, stride, window_batch_size=3, n_cls=4)
    expected = sum(_reference_view(forward, v, m["flip"], ori_shape, ws, stride) for v, m in zip(views, metas)) / 12
    assert out.shape == (4, 12, 16)
    assert torch.allclose(out, expected, atol=1e-12)
    assert torch.allclose(out.sum(0), torch.ones(ori_shape, dtype=torch.float64))


def test_inference_views_small_image_goes_through_guard():
    im = torch.rand(1, 3, 5, 9)
    seen = []

    def forward(windows, boxes):
        seen.append(windows.shape)
        return windows[:, :2]

    out = inference_views(forward, [im], [{"flip": False}], (5, 9), 8, 8, 4, n_cls=2)
    assert out.shape == (2, 5, 9)
    assert seen == [(2, 3, 8, 8)]  # 5x9 -> 8x14: columns {0, 6}


def test_inference_views_needs_matching_metas():
    with pytest.raises(ValueError, match="meta"):
        inference_views(_identity_forward, [torch.rand(3, 8, 8)], [], (8, 8), 8, 8)


def test_resolve_window_defaults_per_command():
    """Evaluating on a dataset: the training crop and the dataset's stride (config.yml); segmenting
    images: the run's inference_kwargs. Either way the stride never exceeds the window."""
    model = types.SimpleNamespace(crop_size=(480, 480), reduction_method="none")
    variant = {"dataset_kwargs": {"crop_size": 480}, "inference_kwargs": {"window_size": 400, "window_stride": 300}}
    assert resolve_window(model, variant, "pascal_context") == (480, 320)
    assert resolve_window(model, variant) == (400, 300)
    assert resolve_window(model, variant, window_size=256) == (256, 256)
    assert resolve_window(model, {}) == (480, 480)
    for dataset in ("pascal_context", None):
        with pytest.raises(ValueError, match="window stride 500 must be in 1..480 .*--window-stride"):
            resolve_window(model, variant, dataset, window_size=480, window_stride=500)
    sharing = types.SimpleNamespace(crop_size=(480, 480), reduction_method="cts")
    with pytest.raises(ValueError, match="--window-size 480"):
        resolve_window(sharing, variant)


def test_view_plan_is_the_evaluation_pipelines():
    """One rule for the test-time views (`view_plan`): the evaluation pipeline's ratios and flip
    are its own, and `segm.inference.augmented_views` builds the same (tests/test_inference.py)."""
    from segm.data import pipelines

    assert view_plan(False) == ([1.0], False) and view_plan(False, flip=True) == ([1.0], True)
    assert view_plan(True) == ([0.5, 0.75, 1.0, 1.25, 1.5, 1.75], True) == (list(MULTISCALE_RATIOS), True)
    for multiscale in (False, True):
        aug = pipelines.test_pipeline(im_size=64, max_ratio=4, normalization="vit", multiscale=multiscale)[1]
        assert (aug["img_ratios"], aug["flip"]) == view_plan(multiscale)
