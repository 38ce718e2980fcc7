"""Image inference: `segm.predict`, the sharing maps, the dataset palette and the
`segm.inference` command on grey, RGBA and odd-sized images. Tiny models, CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import segm
from segm.data import dataset_info
from segm.inference import evaluation_scale, main, predict_image
from segm.visualize import checkpoint_palette, colorize
from tests.helpers.models import CROP, K, make_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def _normalised(image: np.ndarray) -> torch.Tensor:
    return ((torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5)[None]


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(rng.integers(0, 256, (70, 50), dtype=np.uint8), "L").save(d / "grey.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA").save(d / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)).save(d / "odd.jpg")
    (d / "notes.txt").write_text("not an image")
    return d


def _check_outputs(out, names):
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(names), files
    assert not list(out.glob("*.tmp"))


def test_cli_folder_grey_rgba_odd_sizes(synthetic_root, tmp_path, images):
    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root, policy_method="no_sharing")
    out_blend, out_plain = tmp_path / "blend", tmp_path / "plain"
    runner = CliRunner()
    r = runner.invoke(main, ["--model-path", str(ckpt), "-i", str(images), "-o", str(out_blend), "--device", "cpu",
                             "--no-legend"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["--model-path", str(ckpt), "-i", str(images), "-o", str(out_plain), "--no-blend",
                             "--no-legend"])
    assert r.exit_code == 0, r.output
    _check_outputs(out_blend, ["grey.png", "odd.png", "rgba.png"])

    model, variant = segm.load_model(ckpt)
    palette = np.array(dataset_info("synthetic", data_root=synthetic_root).palette, dtype=np.uint8)
    im_size = evaluation_scale(variant)[0]  # the command resizes as evaluation does
    for name, src in [("grey", "grey.png"), ("rgba", "rgba.png"), ("odd", "odd.jpg")]:
        rgb = Image.open(images / src).convert("RGB")
        expected = colorize(segm.predict(model, rgb, variant=variant, im_size=im_size), palette)
        plain = Image.open(out_plain / f"{name}.png")
        assert plain.mode == "RGB" and plain.size == rgb.size
        assert np.array_equal(np.asarray(plain), expected)  # the checkpoint dataset's palette
        blended = np.asarray(Image.open(out_blend / f"{name}.png"))
        assert np.array_equal(blended, np.asarray(Image.blend(rgb, Image.fromarray(expected), 0.5)))


def test_cli_show_sharing_single_file(synthetic_root, tmp_path, images):
    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root, policy_method="random")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["--model-path", str(ckpt), "-i", str(images / "odd.jpg"), "-o", str(out),
                                  "--show-sharing", "--cpu"])
    assert r.exit_code == 0, r.output
    _check_outputs(out, ["odd.png", "odd_sharing.png"])
    sharing = np.asarray(Image.open(out / "odd_sharing.png"))
    src = np.asarray(Image.open(images / "odd.jpg").convert("RGB"))
    assert sharing.shape == src.shape
    changed = (sharing != src).any(-1).mean()
    assert 0.1 < changed < 0.9  # shared superpatches tinted, the rest untouched


@pytest.mark.parametrize("shape", [(0, 0, 3), (5, 0, 3), (0, 7)])
def test_predict_refuses_an_empty_image(synthetic_root, tmp_path, shape):
    _, model, variant = make_model_dir(tmp_path, synthetic_root, policy_method="no_sharing")
    with pytest.raises(ValueError, match="the image is empty"):
        segm.predict(model, np.zeros(shape, np.uint8), variant=variant)


def test_predict_equals_one_window_forward(synthetic_root, tmp_path):
    # A window-sized image is one window: predict = argmax of the model on the normalised image.
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (CROP, CROP, 3), dtype=np.uint8)
    for policy in ("no_sharing", "random"):
        _, model, variant = make_model_dir(tmp_path / policy, synthetic_root, policy_method=policy)
        model.reducer.reset()
        label = segm.predict(model, image, variant=variant)
        model.reducer.reset()
        with torch.no_grad():
            expected = model(_normalised(image))[0].argmax(0).numpy()
        assert label.dtype == np.int64 and label.shape == (CROP, CROP)
        assert np.array_equal(label, expected)


def test_predict_input_kinds(synthetic_root, tmp_path):
    _, model, variant = make_model_dir(tmp_path, synthetic_root, policy_method="no_sharing")
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (37, 91, 3), dtype=np.uint8)  # shorter than a window: guard
    a = segm.predict(model, rgb, variant=variant)
    assert a.shape == (37, 91) and a.dtype == np.int64 and a.min() >= 0 and a.max() < K
    rgba = np.concatenate([rgb, np.full((37, 91, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(segm.predict(model, rgba, variant=variant), a)
    assert np.array_equal(segm.predict(model, Image.fromarray(rgba, "RGBA"), variant=variant), a)
    grey = rgb[..., 0]
    g = segm.predict(model, grey, variant=variant)
    assert np.array_equal(g, segm.predict(model, Image.fromarray(grey, "L"), variant=variant))
    model.variant = variant  # set by the command's loader; predict then needs no variant
    assert np.array_equal(segm.predict(model, rgb), a)


def test_predict_errors(synthetic_root, tmp_path):
    _, model, variant = make_model_dir(tmp_path, synthetic_root, policy_method="random")
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="variant"):
        segm.predict(model, image)
    with pytest.raises(TypeError, match="uint8"):
        segm.predict(model, image.astype(np.float32), variant=variant)
    with pytest.raises(ValueError, match="window_size=64"):
        segm.predict(model, image, variant=variant, window_size=96)
    from segm.model.reduction.scorers import OracleScorer

    model.reducer.scorer = OracleScorer(4, 16)
    with pytest.raises(ValueError, match="oracle"):
        segm.predict(model, image, variant=variant)


def test_sharing_maps_follow_the_layout(synthetic_root, tmp_path):
    _, model, variant = make_model_dir(tmp_path, synthetic_root, policy_method="random")
    image = np.random.default_rng(3).integers(0, 256, (CROP, 2 * CROP, 3), dtype=np.uint8)
    model.reducer.reset()
    label, (shared, block) = predict_image(model, image, variant=variant, window_stride=CROP, return_sharing=True)
    model.reducer.reset()
    with torch.no_grad():
        windows = torch.cat([_normalised(image[:, :CROP]), _normalised(image[:, CROP:])])
        mask2 = model.forward_all(windows).layout.masks()[1]  # (2, 2, 2): S = 2 per window
    expected = mask2.repeat_interleave(32, 1).repeat_interleave(32, 2)
    assert np.array_equal(shared, torch.cat(list(expected), dim=1).numpy())
    assert shared.sum() == 2 * 2 * 32 * 32
    # tokens numbered per window: T = 16 − 3·2 = 10 per window; a shared superpatch is one token
    assert len(np.unique(block)) == 2 * 10
    assert all(len(np.unique(block[shared & (block == b)])) <= 1 for b in np.unique(block))
    assert all((shared[block == b]).sum() in (0, 32 * 32) for b in np.unique(block))


def test_checkpoint_palette(synthetic_root, tmp_path):
    variant = {"dataset_kwargs": {"dataset": "synthetic", "data_root": str(synthetic_root)}}
    palette, note = checkpoint_palette(variant, K)
    assert note is None and palette == [list(c) for c in dataset_info("synthetic", data_root=synthetic_root).palette]
    variant["dataset_kwargs"]["data_root"] = str(tmp_path / "gone")
    palette, note = checkpoint_palette(variant, K)
    assert "generated palette" in note and len(palette) == K
    assert checkpoint_palette(variant, K)[0] == palette  # deterministic
    assert "150 classes" in checkpoint_palette({"dataset_kwargs": {"dataset": "ade20k"}}, K)[1]
    assert len(checkpoint_palette({"dataset_kwargs": {"dataset": "ade20k"}}, 150)[0]) == 150
    # a model carrying too short a class list is told so, not sent looking for $DATASET
    short = {"classes": {"names": ["a", "b"], "palette": [[0, 0, 0]] * 2}, "dataset_kwargs": {"dataset": "ade20k"}}
    note = checkpoint_palette(short, K)[1]
    assert "its names list has 2 entries for 10 classes" in note and "DATASET" not in note


def test_cli_errors(synthetic_root, tmp_path, images):
    runner = CliRunner()

    def one_line_error(args, fragment):
        r = runner.invoke(main, args)
        assert r.exit_code != 0 and "Traceback" not in r.output
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], r.output

    missing = str(tmp_path / "none" / "checkpoint.pth")
    one_line_error(["--model-path", missing, "-i", str(images), "-o", str(tmp_path / "o")], "checkpoint not found")
    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root, policy_method="no_sharing")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(["--model-path", str(ckpt), "-i", str(empty), "-o", str(tmp_path / "o")], "no images")
    one_line_error(["--model-path", str(ckpt), "-i", str(images), "-o", str(images)], "overwrite its input")
    assert not (tmp_path / "o").exists()


def test_16bit_images_are_scaled_like_training_reads_them(synthetic_root, tmp_path):
    """A 16-bit PNG (file or PIL image) is read as its high byte by the reader training uses,
    not clipped to white by PIL's convert("RGB"); the CLI writes the same segmentation."""
    import cv2

    from segm.data.io import read_image
    from segm.inference import load_image

    grey = (np.arange(70 * 50).reshape(70, 50) * 37 % 65536).astype(np.uint16)
    rgb = np.stack([grey, grey[::-1], 65535 - grey], -1)
    d = tmp_path / "in16"
    d.mkdir()
    cv2.imwrite(str(d / "grey16.png"), grey)
    cv2.imwrite(str(d / "rgb16.png"), rgb[..., ::-1])
    as8 = {"grey16": np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, 2), "rgb16": (rgb >> 8).astype(np.uint8)}
    for name, want in as8.items():
        assert np.array_equal(load_image(d / f"{name}.png"), want)
        assert np.array_equal(load_image(d / f"{name}.png"), read_image(d / f"{name}.png"))

    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root, policy_method="no_sharing")
    model, variant = segm.load_model(ckpt)
    with Image.open(d / "grey16.png") as im:
        assert im.mode == "I;16"
        assert np.array_equal(segm.predict(model, im, variant=variant), segm.predict(model, as8["grey16"], variant=variant))
    out = tmp_path / "out16"
    r = CliRunner().invoke(main, ["--model-path", str(ckpt), "-i", str(d), "-o", str(out), "--no-blend", "--cpu",
                                  "--no-legend", "--native-size"])
    assert r.exit_code == 0, r.output
    palette = np.array(dataset_info("synthetic", data_root=synthetic_root).palette, dtype=np.uint8)
    for name, want in as8.items():
        expected = colorize(segm.predict(model, want, variant=variant), palette)
        assert np.array_equal(np.asarray(Image.open(out / f"{name}.png")), expected)


def test_corrupt_input_is_one_line_naming_it(synthetic_root, tmp_path):
    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root, policy_method="no_sharing")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    r = CliRunner().invoke(main, ["--model-path", str(ckpt), "-i", str(bad), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == f"Error: cannot decode image {bad}: the file is corrupt or not an image"


# ----------------------------------------------------------------------------- options and outputs
def test_cli_index_format_and_legend(synthetic_root, tmp_path, images):
    """--format index: <name>.png alone, 8-bit single channel, the label values (synthetic keeps
    train labels); overlays carry a legend strip below the image unless --no-legend."""
    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root, policy_method="no_sharing")
    model, variant = segm.load_model(ckpt)
    runner = CliRunner()
    r = runner.invoke(main, ["--model-path", str(ckpt), "-i", str(images), "-o", str(tmp_path / "idx"), "--cpu",
                             "--format", "index", "--native-size"])
    assert r.exit_code == 0, r.output
    _check_outputs(tmp_path / "idx", ["grey.png", "odd.png", "rgba.png"])
    r = runner.invoke(main, ["--model-path", str(ckpt), "-i", str(images / "odd.jpg"), "-o", str(tmp_path / "ov"),
                             "--cpu", "--no-blend", "--native-size"])
    assert r.exit_code == 0, r.output
    rgb = Image.open(images / "odd.jpg").convert("RGB")
    label = segm.predict(model, rgb, variant=variant)
    with Image.open(tmp_path / "idx" / "odd.png") as im:
        assert im.mode == "L" and im.size == rgb.size
        assert np.array_equal(np.asarray(im), label)
    overlay = np.asarray(Image.open(tmp_path / "ov" / "odd.png"))
    palette = np.array(dataset_info("synthetic", data_root=synthetic_root).palette, dtype=np.uint8)
    h = rgb.size[1]
    assert overlay.shape[0] > h and overlay.shape[1] == rgb.size[0]
    assert np.array_equal(overlay[:h], colorize(label, palette))
    strip_colours = {tuple(c) for c in overlay[h:].reshape(-1, 3)}
    assert {tuple(palette[c]) for c in np.unique(label)} <= strip_colours  # a swatch per class present
    absent = [tuple(palette[c]) for c in range(K) if c not in np.unique(label)]
    assert not strip_colours & set(absent)


def test_window_and_amp_options_reach_the_model(synthetic_root, tmp_path, images, monkeypatch):
    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root, policy_method="no_sharing")
    seen = []
    forward = segm.model.segmenter.Segmenter.forward_scores  # the windows' class scores, before upsampling

    def spy(self, im, *a, **kw):
        seen.append((tuple(im.shape), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, im, *a, **kw)

    monkeypatch.setattr(segm.model.segmenter.Segmenter, "forward_scores", spy)
    args = ["--model-path", str(ckpt), "-i", str(images / "odd.jpg"), "--cpu", "--window-batch-size", "1",
            "--native-size"]
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a"), "--window-size", "48", "--window-stride", "48",
                                  "--amp", "bf16"])
    assert r.exit_code == 0, r.output
    # 97×131: rows 0, 48, 49; columns 0, 48, 83 → 9 windows of 48, all autocast to bf16
    assert [s[0] for s in seen] == [(1, 3, 48, 48)] * 9 and all(s[1:] == (True, torch.bfloat16) for s in seen)
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "b"), "--window-stride", "96"])
    assert r.exit_code == 1 and "window stride 96 must be in 1..64" in r.output


def test_flip_and_multiscale_average_the_evaluation_views(synthetic_root, tmp_path):
    """--flip averages the image and its mirror; --multiscale the evaluation's 12 views, which
    match those the evaluation pipeline builds for an image at the test size."""
    from segm.data import build_dataset
    from segm.eval.evaluate import predict_views
    from segm.inference import augmented_views, load_image, predict_probs

    _, model, variant = make_model_dir(tmp_path, synthetic_root, policy_method="no_sharing")
    db = build_dataset("synthetic", "val", im_size=128, crop_size=CROP, normalization="vit",
                       data_root=synthetic_root, multiscale=True)
    item = db[0]
    image = load_image(item["im_metas"][0]["filename"])
    plain = predict_probs(model, image, variant=variant)
    mirrored = predict_probs(model, np.ascontiguousarray(image[:, ::-1]), variant=variant).flip(-1)
    flipped = predict_probs(model, image, variant=variant, flip=True)
    assert torch.allclose(flipped, (plain + mirrored) / 2, atol=1e-6)

    ms = predict_probs(model, image, variant=variant, multiscale=True)
    ori = tuple(item["segmentation"].shape)
    assert len(item["im"]) == 12 and ms.shape == (K, *ori)
    reference = predict_views(model, item["im"], item["im_metas"], ori, window_size=CROP, window_stride=32)
    views, metas = augmented_views(torch.zeros(3, *ori), multiscale=True)
    assert sorted((tuple(v.shape), m["flip"]) for v, m in zip(views, metas)) == sorted(
        (tuple(v.shape), m["flip"]) for v, m in zip(item["im"], item["im_metas"]))
    # the same views, resized by torch here and by cv2 on 8-bit pixels in the pipeline
    assert (ms - reference).abs().mean() < 1e-4 and (ms.argmax(0) == reference.argmax(0)).float().mean() > 0.99


def test_predict_probs_and_lists(synthetic_root, tmp_path):
    _, model, variant = make_model_dir(tmp_path, synthetic_root, policy_method="no_sharing")
    rng = np.random.default_rng(3)
    a, b = (rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(64, 80, 3), (70, 66, 3)])
    probs = segm.predict(model, [a, b], variant=variant, return_probs=True)
    assert isinstance(probs, list) and [p.shape for p in probs] == [(K, 64, 80), (K, 70, 66)]
    assert all(p.dtype == np.float32 and np.allclose(p.sum(0), 1, atol=1e-5) for p in probs)
    labels = segm.predict(model, (a, b), variant=variant)
    assert [lab.dtype for lab in labels] == [np.int64] * 2
    assert np.array_equal(labels[1], segm.predict(model, b, variant=variant))
    assert np.array_equal(labels[0], probs[0].argmax(0))


def test_sharing_maps_are_the_first_views_with_test_time_views(synthetic_root, tmp_path):
    from segm.policy_choice import PolicyChoice, apply_policy_choice

    _, model, variant = make_model_dir(tmp_path, synthetic_root, policy_method="no_sharing")
    model, variant = apply_policy_choice(model, variant, PolicyChoice("content", num_shared=2))
    image = np.random.default_rng(4).integers(0, 256, (70, 100, 3), dtype=np.uint8)
    _, (shared, block) = predict_image(model, image, variant=variant, return_sharing=True)
    _, (shared_ms, block_ms) = predict_image(model, image, variant=variant, return_sharing=True, multiscale=True)
    assert shared.any() and np.array_equal(shared, shared_ms) and np.array_equal(block, block_ms)


def test_augmented_views_follow_the_view_plan():
    """`augmented_views` builds `view_plan`'s views, the image itself first (bit for bit)."""
    from segm.eval.window import view_plan
    from segm.inference import augmented_views

    im = torch.randn(3, 10, 14)
    for multiscale, flip in [(False, False), (False, True), (True, False)]:
        views, metas = augmented_views(im, multiscale=multiscale, flip=flip)
        ratios, mirrored = view_plan(multiscale, flip)
        assert len(views) == len(metas) == len(ratios) * (2 if mirrored else 1)
        assert views[0] is im and metas[0] == {"flip": False}
        assert [m["flip"] for m in metas] == [False, True] * len(ratios) if mirrored else [False]
        expected = [1.0] + [r for r in ratios if r != 1.0]
        assert [tuple(v.shape[-2:]) for v in views[:: 2 if mirrored else 1]] == [
            (int(10 * r + 0.5), int(14 * r + 0.5)) for r in expected]
        if mirrored:
            assert all(torch.equal(a.flip(-1), b) for a, b in zip(views[::2], views[1::2]))
