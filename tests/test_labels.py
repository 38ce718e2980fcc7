"""The label path: labels without full-resolution logits, equal to the full path's, ties included."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segm
from segm.bench.memory import PeakTensorMemory
from segm.eval.window import GridScores, inference_views, sliding_window_inference, view_labels, views_labels
from segm.model.labels import (UNIFORM_MARGIN_EPS, cell_of, dominant_cells, label_bands, labels_from_scores,
                               resized_labels, upsampled_bands)
from tests.helpers.models import tiny_net_kwargs, tiny_variant


def _full_labels(masks, patch, size):
    gh, gw = masks.shape[-2:]
    logits = F.interpolate(masks, size=(gh * patch, gw * patch), mode="bilinear", align_corners=False)
    return logits[:, :, : size[0], : size[1]].argmax(1)


def _with_ties(x, dim):
    """Class 1 a copy of class 0 (every pixel ties), class 3 of class 2 on half the grid."""
    x = x.clone()
    x.select(dim, 1).copy_(x.select(dim, 0))
    half = x.select(dim, 2)[..., : x.shape[-1] // 2]
    x.select(dim, 3)[..., : x.shape[-1] // 2].copy_(half)
    return x


SMALL_MAPS = [(1, 7, (5, 9), 16), (2, 5, (8, 8), 8), (1, 19, (33, 17), 16), (1, 5, (3, 3), 16), (1, 6, (4, 4), 15)]


@pytest.mark.parametrize("b, k, grid, patch, dtype", [
    *((*m, torch.float32) for m in SMALL_MAPS), *((*m, torch.bfloat16) for m in SMALL_MAPS),
    (1, 150, (32, 32), 16, torch.float32),  # ADE20K's classes at 512 px
])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bands_equal_the_full_upsampling(b, k, grid, patch, layout, dtype):
    g = torch.Generator().manual_seed(k)
    if layout == "channels_last":  # what the Segmenter's unmerge gives
        masks = torch.randn(b, *grid, k, generator=g).permute(0, 3, 1, 2)
    else:
        masks = torch.randn(b, k, *grid, generator=g)
    masks = _with_ties(masks, 1).to(dtype)
    full_size = (grid[0] * patch, grid[1] * patch)
    for size in [full_size, (full_size[0] - 5, full_size[1] - 3)]:
        full = _full_labels(masks, patch, size)
        assert not (full == 1).any()  # the tie went to class 0 everywhere
        logits = F.interpolate(masks, size=full_size, mode="bilinear", align_corners=False)
        for rows in (1, 2, 3, 4, 8):
            assert torch.equal(labels_from_scores(masks, patch, size, rows), full)
            spans = []
            for y0, y1, band in upsampled_bands(masks, patch, size, rows):  # each valid until the next
                assert torch.equal(band, logits[:, :, y0:y1, : size[1]])  # bit for bit, not only the argmax
                spans.append((y0, y1))
            assert [y0 for y0, _ in spans] == [0, *(y1 for _, y1 in spans[:-1])] and spans[-1][1] == size[0]


@pytest.fixture
def every_map(monkeypatch):
    """The shortcut taken on maps of any size and class count (by default only where it pays)."""
    import segm.model.labels as labels_module

    monkeypatch.setattr(labels_module, "SHORTCUT_MIN_CLASSES", 1)
    monkeypatch.setattr(labels_module, "SHORTCUT_MIN_CELLS", 1)


def _segmentation_like(b, k, grid, seed, layout="channels_last", blob=4):
    """Scores of a confident model: blobs of blob × blob cells of one class (4 above the rest),
    noise of 0.3, and classes 1 and 2 tying exactly where class 1 wins."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, k, (b, 1, -(-grid[0] // blob), -(-grid[1] // blob)), generator=g).float()
    coarse[:, :, 0, 0] = 1  # a blob of class 1 in every image
    coarse[:, :, -1] = 3  # and a last row of one class (bands without a boundary)
    blobs = F.interpolate(coarse, scale_factor=blob, mode="nearest")[:, 0, : grid[0], : grid[1]].long()
    masks = 4 * F.one_hot(blobs, k).float() + 0.3 * torch.randn(b, *grid, k, generator=g)
    masks[..., 2] = torch.where(blobs == 1, masks[..., 1], masks[..., 2])
    masks = masks.permute(0, 3, 1, 2)
    return masks if layout == "channels_last" else masks.contiguous()


# ADE20K's size only in the layout a Segmenter gives (the other is slow to check)
WON_CELL_MAPS = [(*m, layout) for m in [(2, 7, (9, 12), 16), (2, 19, (16, 10), 8), (1, 5, (6, 5), 32),
                                         (1, 6, (8, 8), 14)]
                 for layout in ("contiguous", "channels_last")] + [(1, 150, (32, 32), 16, "channels_last")]


@pytest.mark.parametrize("b, k, grid, patch, layout", WON_CELL_MAPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cells_one_class_wins_give_the_full_paths_labels(b, k, grid, patch, layout, dtype, every_map):
    masks = _segmentation_like(b, k, grid, seed=k + patch, layout=layout).to(dtype)
    dominant = dominant_cells(masks, patch)
    if patch & (patch - 1):  # source coordinates rounded: nothing is claimed
        assert dominant is None
    else:
        assert (dominant >= 0).any()  # the shortcut is taken
        assert not (dominant == 1).any()  # class 1 only wins where class 2 ties it: never claimed
    full_size = (grid[0] * patch, grid[1] * patch)
    small = k < 100  # ADE20K's size once, the small maps cropped and in several band sizes
    for size in [full_size, (full_size[0] - 5, full_size[1] - 3)][: 2 if small else 1]:
        for rows in (None, 1, 3)[: 3 if small else 1]:
            assert torch.equal(labels_from_scores(masks, patch, size, rows), _full_labels(masks, patch, size))
    assert (_full_labels(masks, patch, full_size) == 1).any()  # the tie's first class


def test_bands_all_claimed_are_skipped_and_few_open_pixels_compared_alone(monkeypatch):
    """ADE20K's size with regions of 8 × 8 patches: some bands need no upsampling, some compare
    only their open pixels (copied out), some every pixel; the labels are the full path's."""
    import segm.model.labels as labels_module

    masks = _segmentation_like(2, 150, (32, 32), seed=5, blob=8)
    seen, plain = [], labels_module._open_labels

    def spy(band, out, todo):
        seen.append((float(todo.float().mean()), band.permute(0, 2, 3, 1)[0].is_contiguous()))
        plain(band, out, todo)

    monkeypatch.setattr(labels_module, "_open_labels", spy)
    labels = labels_from_scores(masks, 16)
    assert torch.equal(labels, _full_labels(masks, 16, (512, 512)))
    bands = len(label_bands(32, 16, labels_module.band_rows_for(masks, 16)))
    assert 0 < len(seen) < bands  # some bands skipped
    gathered = [f for f, rows in seen if rows and f * labels_module.GATHER_BELOW < 1]
    assert gathered and len(gathered) < len(seen)  # both ways of comparing taken


def test_a_winner_within_the_margin_is_not_claimed(every_map):
    """A second class just under the winner's lowest corner: by less than the margin the cell
    stays open, by more it is claimed; the labels equal the full path's either way."""
    masks = torch.zeros(1, 3, 4, 4)
    masks[:, 0] = 10.0
    eps = torch.finfo(torch.float32).eps * 10.0
    for gap, claimed in ((UNIFORM_MARGIN_EPS * eps / 2, False), (UNIFORM_MARGIN_EPS * eps * 2, True)):
        m = masks.clone()
        m[0, 1, 1, 1] = 10.0 - gap
        dominant = dominant_cells(m, 16)
        # the four cells around grid point (1, 1)
        assert bool((dominant[0, 1:3, 1:3] == 0).all()) == claimed
        assert torch.equal(labels_from_scores(m, 16), _full_labels(m, 16, (64, 64)))


def test_non_finite_scores_take_the_plain_path(every_map):
    masks = _segmentation_like(1, 5, (6, 6), seed=0)
    masks[0, 3, 2, 2] = float("inf")
    assert dominant_cells(masks, 16) is None
    assert torch.equal(labels_from_scores(masks, 16), _full_labels(masks, 16, (96, 96)))


def test_cell_of_names_the_grid_rows_an_output_row_reads():
    """Output row y reads grid rows ⌊s⌋ and ⌊s⌋ + 1 with s = max(0, (y + 0.5)/P − 0.5), the second
    with weight s − ⌊s⌋; its cell's grid points, cell − 1 and cell (clamped at 0), are those read
    with a weight above zero."""
    for patch in (8, 16, 32):
        y = torch.arange(10 * patch)
        s = ((y + 0.5) / patch - 0.5).clamp(min=0)
        first = s.floor().long()
        last = torch.where(s > first, first + 1, first)
        cell = cell_of(y, patch)
        assert torch.equal((cell - 1).clamp(min=0), first) and bool((last <= cell).all())


def test_bands_read_their_grid_rows_only():
    for g0, g1, y0, y1 in label_bands(32, 16, 4):
        assert g0 * 16 <= y0 and y1 <= g1 * 16 and g1 - g0 <= 5
    with pytest.raises(ValueError, match="band_rows"):
        label_bands(8, 16, 0)


@pytest.mark.parametrize("k, size, out", [(150, (64, 85), (75, 100)), (19, (64, 64), (100, 37)),
                                          (33, (77, 91), (50, 60)), (5, (40, 40), (41, 39))])
def test_resized_labels_equal_the_full_resize(k, size, out):
    x = _with_ties(torch.randn(k, *size, generator=torch.Generator().manual_seed(k)), 0)
    full = F.interpolate(x[None], out, mode="bilinear", align_corners=False)[0].argmax(0)
    for chunk in (1, 2, 5, 16, 200):
        assert torch.equal(resized_labels(x, out, chunk), full)


def _model(policy_method, n_cls=10, crop=64):
    net = {**tiny_net_kwargs(policy_method, n_cls=n_cls), "image_size": (crop, crop)}
    if policy_method == "no_sharing":
        net["policy_schedule"] = ((crop // 16) ** 2, 0)
    torch.manual_seed(0)
    model = segm.create_segmenter(net).eval()
    dec = model.decoder.head  # classes 1 and 0 score alike: a tie on every pixel
    with torch.no_grad():
        dec.weight[1] = dec.weight[0]
        dec.bias[1] = dec.bias[0]
    return model


@pytest.mark.parametrize("policy_method", ["no_sharing", "random"])
def test_forward_labels_equal_the_logits_argmax(policy_method):
    model = _model(policy_method)
    g = torch.Generator().manual_seed(1)
    for shape in [(2, 3, 64, 64), (1, 3, 64, 64)]:
        im = torch.randn(*shape, generator=g)
        with torch.no_grad():
            model.reducer.reset(0)
            full = model.forward_all(im).logits.argmax(1)
            model.reducer.reset(0)
            labels = model.forward_labels(im)
        assert labels.dtype == torch.int64 and torch.equal(labels, full) and not (full == 1).any()


def test_forward_labels_of_an_unpadded_size():
    model = _model("no_sharing")
    im = torch.randn(1, 3, 57, 50)  # padded to 64 inside, cropped back
    with torch.no_grad():
        assert torch.equal(model.forward_labels(im), model(im).argmax(1))
        assert model.forward_labels(im).shape == (1, 57, 50)


def _forwards(model):
    def scores(windows, boxes):
        return GridScores(model.forward_scores(windows)[0], model.patch_size)

    def logits(windows, boxes):
        return model(windows)
    return scores, logits


@pytest.mark.parametrize("view_shape, ori, flip", [((64, 64), (64, 64), False), ((64, 64), (64, 64), True),
                                                  ((64, 100), (64, 100), False), ((70, 90), (50, 61), True),
                                                  ((40, 64), (40, 64), False)])
def test_view_labels_equal_the_full_path(view_shape, ori, flip):
    model = _model("no_sharing")
    view = torch.randn(3, *view_shape, generator=torch.Generator().manual_seed(2))
    scores, logits = _forwards(model)
    meta = {"flip": flip}
    full = inference_views(logits, [view], [meta], ori, 64, 32, 2, 10).argmax(0)
    for forward in (scores, logits):
        labels = view_labels(forward, view, meta, ori, 64, 32, 2, 10)
        assert labels.shape == ori and torch.equal(labels, full)


def test_views_labels_one_view_is_view_labels_several_the_mean_probabilities_argmax():
    model = _model("no_sharing")
    view = torch.randn(3, 70, 90, generator=torch.Generator().manual_seed(4))
    scores, _ = _forwards(model)
    views, metas, ori = [view, view.flip(-1)], [{"flip": False}, {"flip": True}], (50, 61)
    one = views_labels(scores, views[:1], metas[:1], ori, 64, 32, 2, 10)
    assert torch.equal(one, view_labels(scores, view, metas[0], ori, 64, 32, 2, 10))
    several = views_labels(scores, views, metas, ori, 64, 32, 2, 10)
    assert torch.equal(several, inference_views(scores, views, metas, ori, 64, 32, 2, 10).argmax(0))


def test_grid_scores_fill_the_canvas_as_logits_do():
    model = _model("random")
    im = torch.randn(3, 100, 130, generator=torch.Generator().manual_seed(3))
    scores, logits = _forwards(model)
    model.reducer.reset(0)
    a = sliding_window_inference(scores, im, 64, 24, 3, 10)
    model.reducer.reset(0)
    b = sliding_window_inference(logits, im, 64, 24, 3, 10)
    assert torch.equal(a, b)


def test_predict_labels_equal_the_probabilities_argmax(tmp_path):
    model = _model("no_sharing")
    variant = tiny_variant(tmp_path)
    variant["net_kwargs"] = {**variant["net_kwargs"], "policy_method": "no_sharing"}
    rng = np.random.default_rng(0)
    for shape in [(64, 64, 3), (97, 131, 3), (40, 200, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        for im_size in (None, 128):
            label = segm.predict(model, image, variant=variant, im_size=im_size)
            probs = segm.predict(model, image, variant=variant, im_size=im_size, return_probs=True)
            assert label.shape == shape[:2] and np.array_equal(label, probs.argmax(0))


def test_the_label_path_peaks_well_below_the_logits():
    """ViT-Tiny-sized at 512 px, 150 classes: the logits are 150 × 512 × 512 floats (157 MB)."""
    k, crop = 150, 512
    model = _model("no_sharing", n_cls=k, crop=crop)
    im = torch.randn(1, 3, crop, crop)
    logits_bytes = k * crop * crop * 4
    peaks = {}
    for name, fn in {"logits": lambda: model(im).argmax(1), "labels": lambda: model.forward_labels(im),
                     "view": lambda: view_labels(_forwards(model)[0], im[0], {}, (crop, crop), crop, crop, 1, k)}.items():
        with torch.no_grad(), PeakTensorMemory() as tracker:
            fn()
        peaks[name] = tracker.peak
    assert peaks["logits"] >= logits_bytes
    assert peaks["labels"] < logits_bytes / 4 and peaks["view"] < logits_bytes / 4, peaks


def test_skipping_cells_peaks_well_below_the_logits():
    """A confident model's scores at ADE20K's size: the labels' peak stays a fraction of the logits'."""
    for blob in (4, 8):
        masks = _segmentation_like(1, 150, (32, 32), seed=blob, blob=blob)
        assert (dominant_cells(masks, 16) >= 0).float().mean() > 0.5
        with torch.no_grad(), PeakTensorMemory() as tracker:
            labels_from_scores(masks, 16)
        assert tracker.peak < 150 * 512 * 512 * 4 / 4, tracker.peak


def test_labels_of_scores_that_require_grad():
    """Outside no_grad (e.g. a training loop asking for labels) the bands are fresh tensors."""
    masks = torch.randn(2, 5, 8, 8, requires_grad=True)
    full = F.interpolate(masks, size=(128, 128), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(labels_from_scores(masks, 16, band_rows=2), full)


def test_the_label_path_timing_script_checks_and_times_both_ways():
    from click.testing import CliRunner

    from scripts.label_path_timing import main

    res = CliRunner().invoke(main, ["--classes", "40", "--grid", "16", "--batch-size", "1", "--region", "8",
                                    "--threads", "1", "--rounds", "1"])
    assert res.exit_code == 0, res.output
    rows = [line for line in res.output.splitlines() if line.startswith("| random") or line.startswith("| regions")]
    assert len(rows) == 2 and "0.0%" not in rows[1]  # the regions' cells are won outright
