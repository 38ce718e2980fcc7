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
