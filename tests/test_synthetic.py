"""The synthetic dataset generator (`python -m segm.scripts.prepare_synthetic`)."""
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from segm.data import dataset_info, policy_labels, rules_for
from segm.scripts import prepare_synthetic as ps

from .conftest import SYNTHETIC_ARGS


def test_layout_and_classes_file(synthetic_root):
    for folder, n in (("training", 24), ("validation", 8)):
        images = sorted(p.stem for p in (synthetic_root / "images" / folder).glob("*.jpg"))
        labels = sorted(p.stem for p in (synthetic_root / "annotations" / folder).glob("*.png"))
        assert len(images) == n and images == labels
    meta = yaml.safe_load((synthetic_root / "classes.yml").read_text())
    assert meta["ignore_index"] == 255 and meta["reduce_zero_label"] is False
    assert meta["generator"] == ps.generator_args(**SYNTHETIC_ARGS)
    info = dataset_info("synthetic", data_root=synthetic_root)
    assert 8 <= info.n_cls <= 12 and len({tuple(c) for c in info.palette}) == info.n_cls
    assert not list(synthetic_root.parent.glob(".synthetic*"))  # no temp folders left


def test_label_values_and_sizes(synthetic_root):
    ignore, total, seen = 0, 0, set()
    for png in sorted((synthetic_root / "annotations").rglob("*.png")):
        label = np.array(Image.open(png))
        image = Image.open(synthetic_root / "images" / png.parent.name / f"{png.stem}.jpg")
        assert image.mode == "RGB" and image.size == (label.shape[1], label.shape[0])
        assert label.shape[0] == 128 and label.shape[1] in (128, 160, 192)
        seen |= set(np.unique(label).tolist())
        ignore += int((label == 255).sum())
        total += label.size
    assert seen <= set(range(10)) | {255} and len(seen - {255}) >= 8
    assert 0 < ignore / total < 0.01  # thin outlines only


def test_deterministic_per_seed_and_index():
    a_img, a_lab = ps.make_sample(0, 0, 3, 64)
    b_img, b_lab = ps.make_sample(0, 0, 3, 64)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    c_img, _ = ps.make_sample(1, 0, 3, 64)
    d_img, _ = ps.make_sample(0, 1, 3, 64)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_img, d_img)


def test_single_class_block_fraction_at_256():
    single = total = 0
    for i in range(24):
        s, t = ps.block_counts(ps.make_sample(0, 0, i, 256)[1])
        single, total = single + s, total + t
    assert 0.4 <= single / total <= 0.7
    # and this is what the policy labels call shareable (no all-ignore blocks occur)
    import torch

    lab = torch.from_numpy(ps.make_sample(0, 0, 0, 256)[1][:, :256].astype(np.int64))
    assert int(policy_labels(lab, rules_for("synthetic")).sum()) == ps.block_counts(lab.numpy())[0]


def test_classes_are_separable_by_colour(synthetic_root):
    sums, counts = np.zeros((10, 3)), np.zeros(10)
    for png in (synthetic_root / "annotations" / "training").glob("*.png"):
        label = np.array(Image.open(png))
        image = np.array(Image.open(synthetic_root / "images" / "training" / f"{png.stem}.jpg"), float)
        for c in np.unique(label[label < 255]):
            sums[c] += image[label == c].sum(0)
            counts[c] += (label == c).sum()
    present = counts > 0
    means = sums[present] / counts[present, None]
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1) + 1e9 * np.eye(len(means))
    assert dist.min() > 40


def test_rerun_is_noop_and_other_args_need_overwrite(tmp_path):
    out = ps.generate_synthetic(tmp_path, num_train=2, num_val=1, size=64, log=lambda *a: None)
    assert out["created"] and 0 <= out["single_class_fraction"] <= 1
    marker = out["path"] / "images" / "training" / "syn_train_00000.jpg"
    mtime = marker.stat().st_mtime_ns
    again = ps.generate_synthetic(tmp_path, num_train=2, num_val=1, size=64, log=lambda *a: None)
    assert not again["created"] and marker.stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="--overwrite"):
        ps.generate_synthetic(tmp_path, num_train=3, num_val=1, size=64, log=lambda *a: None)
    ps.generate_synthetic(tmp_path, num_train=3, num_val=1, size=64, overwrite=True, log=lambda *a: None)
    assert len(list((out["path"] / "images" / "training").glob("*.jpg"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing(job):
        calls.append(job)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(job)

    real = ps._write_one
    monkeypatch.setattr(ps, "_write_one", failing)
    with pytest.raises(OSError, match="disk full"):
        ps.generate_synthetic(tmp_path, num_train=3, num_val=1, size=64, log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path):
    runner = CliRunner()
    args = [str(tmp_path), "--num-train", "2", "--num-val", "1", "--size", "64", "--workers", "1"]
    res = runner.invoke(ps.main, args)
    assert res.exit_code == 0, res.output
    assert "single-class 32x32 blocks" in res.output
    res = runner.invoke(ps.main, args[:-4] + ["--size", "96", "--workers", "1"])
    assert res.exit_code == 1
    assert res.output.startswith("Error: ") and "--overwrite" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(ps.main, [str(tmp_path / "x"), "--size", "20"])
    assert res.exit_code == 1 and "--size" in res.output
    assert not (tmp_path / "x" / "synthetic").exists()


def test_cli_errors_are_the_prepare_scripts(tmp_path, monkeypatch):
    """The command ends as every preparation script does (`_prepare_common.cli_errors`): one
    `Error:` line, exit code 1, for a bad argument and for a failing disk alike."""
    def disk_full(job):
        raise OSError("disk full")

    monkeypatch.setattr(ps, "_write_one", disk_full)
    for args in (["--num-val", "0"], ["--size", "64", "--workers", "1"]):
        res = CliRunner().invoke(ps.main, [str(tmp_path), *args])
        assert res.exit_code == 1 and res.output.startswith("Error: ") and len(res.output.splitlines()) == 1
    assert "--num-val" in CliRunner().invoke(ps.main, [str(tmp_path), "--num-val", "0"]).output
    assert res.output == "Error: disk full\n"


def test_workers_give_identical_files(tmp_path):
    one = ps.generate_synthetic(tmp_path / "a", num_train=3, num_val=1, size=64, workers=1, log=lambda *a: None)
    two = ps.generate_synthetic(tmp_path / "b", num_train=3, num_val=1, size=64, workers=2, log=lambda *a: None)
    files = sorted(p.relative_to(one["path"]) for p in one["path"].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two["path"]) for p in two["path"].rglob("*") if p.is_file())
    for rel in files:
        assert (one["path"] / rel).read_bytes() == (two["path"] / rel).read_bytes()


# ----------------------------------------------------------------------------- styles
# sha256 of every file of generate_synthetic(num_train=3, num_val=2, size=64, seed=0), computed
# with the generator as it was before `--style` existed (the demo's figures depend on it). The
# JPEGs also pin the installed libjpeg; the label PNGs and classes.yml pin the generator alone.
PLAIN_SHA256 = {
    "annotations/training/syn_train_00000.png": "6fa8d60133b1e2e3229365c59b62ab07083791a26af6d4ccbdec7e06ab6fe6c5",
    "annotations/training/syn_train_00001.png": "b7dbd955d63b8077cb64b49cf4527eb97b00cfb0f165237e0cdc77d909e8527f",
    "annotations/training/syn_train_00002.png": "4ee3dd60713e33568bc0891097d147d456bac38d110a85ad873881ae59a3d039",
    "annotations/validation/syn_val_00000.png": "406a2b6a4258380df66c7aa9324ea2ba7e838386ab1bab04979fe232063493bf",
    "annotations/validation/syn_val_00001.png": "0e4fbbf22254e17a5c0c1944bab91496c9328053cb9187af68a5edd3702e729e",
    "classes.yml": "86e5a9e7b6b6165ad33e61cdbc3137c8cf963509c1628076a24e5b0369fc5d89",
    "images/training/syn_train_00000.jpg": "206a7769043acde11c3f0db6a80ef3e30ff422a00ba84b6b9703499a16eec538",
    "images/training/syn_train_00001.jpg": "8f87cf30ac83fa751ff0d4630abf21fa4cf177290d5fb6d5456b409246aa6c85",
    "images/training/syn_train_00002.jpg": "2be8f364034c10b432b8f8a6c95a14cb451470d58040e53d13d956563ccd3848",
    "images/validation/syn_val_00000.jpg": "b9c50e9fa0ccfde9c0c09772e9fa49ae63f35888edd39e17e0820c62405c03d7",
    "images/validation/syn_val_00001.jpg": "fcd051558aabb2de131f90c541f04ed21bb90fc2432b26d68d85e5d98065c3d4",
}


def _sha256_tree(root):
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_default_style_is_unchanged(tmp_path):
    out = ps.generate_synthetic(tmp_path, num_train=3, num_val=2, size=64, seed=0, log=lambda *a: None)
    assert _sha256_tree(out["path"]) == PLAIN_SHA256
    explicit = ps.generate_synthetic(tmp_path / "b", num_train=3, num_val=2, size=64, seed=0, style="plain",
                                     log=lambda *a: None)
    assert _sha256_tree(explicit["path"]) == PLAIN_SHA256


TEXTURED_ARGS = dict(num_train=16, num_val=8, size=128, seed=0, style="textured")


@pytest.fixture(scope="module")
def textured_root(tmp_path_factory):
    return ps.generate_synthetic(tmp_path_factory.mktemp("textured"), log=lambda *a: None, **TEXTURED_ARGS)["path"]


def test_textured_layout_and_classes_file(textured_root, synthetic_root):
    meta = yaml.safe_load((textured_root / "classes.yml").read_text())
    plain = yaml.safe_load((synthetic_root / "classes.yml").read_text())
    assert meta["generator"] == ps.generator_args(**TEXTURED_ARGS) and meta["generator"]["style"] == "textured"
    assert "style" not in plain["generator"]
    assert {k: v for k, v in meta.items() if k != "generator"} == {k: v for k, v in plain.items() if k != "generator"}
    for folder, n in (("training", 16), ("validation", 8)):
        images = sorted((textured_root / "images" / folder).glob("*.jpg"))
        assert len(images) == n
        for jpg in images:
            label = np.array(Image.open(textured_root / "annotations" / folder / f"{jpg.stem}.png"))
            assert Image.open(jpg).size == (label.shape[1], label.shape[0]) and label.shape[0] == 128
    with pytest.raises(FileExistsError, match="style=textured"):  # another style is other arguments
        ps.generate_synthetic(textured_root.parent, **{**TEXTURED_ARGS, "style": "plain"}, log=lambda *a: None)


def test_textured_is_deterministic_and_keeps_the_scenes(tmp_path):
    a_img, a_lab = ps.make_sample(0, 0, 3, 64, "textured")
    b_img, b_lab = ps.make_sample(0, 0, 3, 64, "textured")
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert np.array_equal(a_lab, ps.make_sample(0, 0, 3, 64)[1])  # same scene as the plain style
    assert not np.array_equal(a_img, ps.make_sample(0, 0, 3, 64)[0])
    assert not np.array_equal(a_img, ps.make_sample(1, 0, 3, 64, "textured")[0])
    kw = dict(num_train=2, num_val=1, size=64, style="textured", log=lambda *a: None)
    one, two = (ps.generate_synthetic(tmp_path / d, seed=0, **kw)["path"] for d in "ab")
    other = ps.generate_synthetic(tmp_path / "c", seed=1, **kw)["path"]
    assert _sha256_tree(one) == _sha256_tree(two)
    differs = [k for k, v in _sha256_tree(other).items() if k != "classes.yml" and v != _sha256_tree(one)[k]]
    assert len(differs) == 6  # every image and label


def _texture_feature(gray, mask):
    """Log share of each mean |grey difference| over (4 directions) × (lags 1, 3) inside mask."""
    h, w = gray.shape
    f = []
    for lag in (1, 3):
        for dy, dx in ((0, lag), (lag, 0), (lag, lag), (lag, -lag)):
            a = gray[: h - dy, max(0, -dx): w - max(0, dx)]
            b = gray[dy:, max(0, dx): w + min(0, dx)]
            both = mask[: h - dy, max(0, -dx): w - max(0, dx)] & mask[dy:, max(0, dx): w + min(0, dx)]
            f.append(np.abs(a - b)[both].mean())
    return np.log(np.array(f) / sum(f))


def _regions(root, folder, min_px=100):
    """(texture features, mean RGBs, classes) of the labelled regions (connected, eroded by 1 px)."""
    import cv2

    tex, rgb, cls = [], [], []
    for png in sorted((root / "annotations" / folder).glob("*.png")):
        label = np.array(Image.open(png))
        image = np.array(Image.open(root / "images" / folder / f"{png.stem}.jpg"), np.float32)
        for c in np.unique(label[label < 255]):
            k, comp = cv2.connectedComponents((label == c).astype(np.uint8), connectivity=4)
            for r in range(1, k):
                m = cv2.erode((comp == r).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
                if m.sum() >= min_px:
                    tex.append(_texture_feature(image.mean(-1), m))
                    rgb.append(image[m].mean(0))
                    cls.append(c)
    return np.array(tex), np.array(rgb), np.array(cls)


def _nearest_class_mean_accuracy(x_train, y_train, x_test, y_test):
    classes = np.unique(y_train)
    means = np.stack([x_train[y_train == c].mean(0) for c in classes])
    scale = x_train.std(0) + 1e-6
    pred = classes[(((x_test[:, None] - means[None]) / scale) ** 2).sum(-1).argmin(1)]
    return float((pred == y_test).mean())


def _accuracies(root):
    """Nearest-class-mean accuracy on validation regions, fitted on training regions, of
    (texture feature, mean colour)."""
    tex_tr, rgb_tr, y_tr = _regions(root, "training")
    tex_va, rgb_va, y_va = _regions(root, "validation")
    assert len(np.unique(y_tr)) == 10 and len(y_va) >= 40
    return (_nearest_class_mean_accuracy(tex_tr, y_tr, tex_va, y_va),
            _nearest_class_mean_accuracy(rgb_tr, y_tr, rgb_va, y_va))


def test_textured_classes_differ_by_texture_not_colour(textured_root, synthetic_root):
    texture, colour = _accuracies(textured_root)  # chance: 0.1 (10 classes)
    assert texture >= 0.7, texture  # 0.87 at seed 0 (0.86-0.94 at seeds 1-5)
    assert colour <= 0.25, colour  # 0.10 at seed 0 (0.02-0.13 at seeds 1-5)
    # the same colour classifier tells the plain style's classes apart
    assert _accuracies(synthetic_root)[1] >= 0.9


def test_bad_style_is_one_error_line(tmp_path):
    with pytest.raises(ValueError, match="--style"):
        ps.make_sample(0, 0, 0, 64, "stripy")
    res = CliRunner().invoke(ps.main, [str(tmp_path), "--style", "stripy", "--size", "64"])
    assert res.exit_code == 1 and res.output == "Error: --style must be one of plain, textured, got 'stripy'\n"
    assert not (tmp_path / "synthetic").exists()
    res = CliRunner().invoke(ps.main, [str(tmp_path), "--style", "textured", "--num-train", "2", "--num-val", "1",
                                       "--size", "64", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((tmp_path / "synthetic" / "classes.yml").read_text())["generator"]["style"] == "textured"
