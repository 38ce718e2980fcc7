"""Dataset evaluation: `evaluate_dataset` against mmseg's `mean_iou` on the same
predictions, a perfect oracle, the 12 multi-scale views, DistributedSampler padding, and the
`segm.eval.miou` command (scores file, saved images, clear errors). Tiny models, CPU."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from segm.config import load_yaml
from segm.data import build_dataset, val_collate
from segm.eval.evaluate import evaluate_dataset
from segm.eval.miou import main as miou_main
from segm.eval.miou import resolve_settings
from segm.eval.window import inference_views, resize_to_window, window_anchors
from tests.helpers.models import CROP, K, make_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def val_loader(root, multiscale=False, im_size=128, **kw):
    db = build_dataset("synthetic", "val", im_size=im_size, crop_size=CROP, normalization="vit",
                       data_root=root, multiscale=multiscale)
    return DataLoader(db, batch_size=1, shuffle=False, collate_fn=val_collate, num_workers=0, **kw)


class OracleStub(nn.Module):
    """Predicts the ground truth it is given (oracle policy path): one-hot logits."""

    policy_method = "oracle"
    needs_labels = True

    def __init__(self, n_cls):
        super().__init__()
        self.n_cls = n_cls
        self.windows = 0

    def forward(self, im, seg_gt=None):
        assert seg_gt is not None and seg_gt.shape == (im.shape[0], *im.shape[-2:])
        self.windows += im.shape[0]
        onehot = F.one_hot(seg_gt.clamp(max=self.n_cls), self.n_cls + 1)[..., : self.n_cls]
        return 10.0 * onehot.permute(0, 3, 1, 2).float()


class CountingStub(nn.Module):
    """Records every window batch; constant logits."""

    policy_method = "no_sharing"
    needs_labels = False

    def __init__(self, n_cls):
        super().__init__()
        self.n_cls = n_cls
        self.window_shapes = []

    def forward(self, im):
        self.window_shapes.append(tuple(im.shape))
        return torch.zeros(im.shape[0], self.n_cls, *im.shape[-2:])


# ----------------------------------------------------------------------------- evaluate_dataset
@pytest.mark.parametrize("multiscale", [False, True])
def test_evaluate_matches_mmseg_mean_iou(synthetic_root, tmp_path, multiscale):
    from mmseg.core.evaluation import mean_iou

    _, model, _ = make_model_dir(tmp_path, synthetic_root)
    frac, stride = (0.25, 64) if multiscale else (1.0, 32)
    loader = val_loader(synthetic_root, multiscale=multiscale)
    model.reducer.reset()
    scores = evaluate_dataset(model, loader, n_cls=K, window_size=CROP, window_stride=stride,
                              window_batch_size=3, device="cpu", frac_dataset=frac, progress=False)

    # Brute force: the same views through inference_views, then mmseg 0.x mean_iou.
    model.reducer.reset()
    preds, labels = [], []
    n = int(np.ceil(len(loader) * frac))
    for i, item in enumerate(loader):
        if i == n:
            break
        probs = inference_views(lambda w, b: model(w), item["im"], item["im_metas"],
                                item["segmentation"].shape, CROP, stride, 3, K)
        preds.append(probs.argmax(0).numpy())
        labels.append(item["segmentation"].numpy())
    ref = mean_iou(preds, labels, K, 255)
    assert scores["num_images"] == n
    assert scores["pixel_accuracy"] == np.round(100 * ref["aAcc"], 2)
    assert scores["mean_accuracy"] == np.round(100 * np.nanmean(ref["Acc"]), 2)
    assert scores["mean_iou"] == np.round(100 * np.nanmean(ref["IoU"]), 2)
    np.testing.assert_allclose(scores["cat_iou"], np.round(100 * ref["IoU"], 2), equal_nan=True)
    assert 0 < scores["mean_iou"] < 100 and scores["inference_time"] > 0


def test_oracle_forward_scores_100_singlescale(synthetic_root):
    stub = OracleStub(K)
    scores = evaluate_dataset(stub, val_loader(synthetic_root), n_cls=K, window_size=CROP, window_stride=32,
                              device="cpu", progress=False)
    assert scores["mean_iou"] == 100.0 and scores["pixel_accuracy"] == 100.0
    assert scores["num_images"] == 8 and stub.windows > 8 * 9  # overlapping windows (stride < ws)


def test_oracle_multiscale_labels_follow_flips(synthetic_root):
    # Labels are cut from the view (rescaled, flipped) exactly like the windows; only the
    # nearest/bilinear rescaling blurs object borders (99.4 mIoU). Without the flip: 46.
    scores = evaluate_dataset(OracleStub(K), val_loader(synthetic_root, multiscale=True), n_cls=K,
                              window_size=CROP, window_stride=CROP, device="cpu", frac_dataset=0.25,
                              progress=False)
    assert scores["pixel_accuracy"] > 98.0 and scores["mean_iou"] > 95.0


def test_multiscale_runs_all_12_views(synthetic_root):
    loader = val_loader(synthetic_root, multiscale=True)
    item = next(iter(loader))
    assert len(item["im"]) == 12 and [m["flip"] for m in item["im_metas"]] == [False, True] * 6
    stub = CountingStub(K)
    evaluate_dataset(stub, loader, n_cls=K, window_size=CROP, window_stride=48, window_batch_size=5,
                     device="cpu", frac_dataset=1 / len(loader), progress=False)
    expected = 0
    for view in item["im"]:
        h, w = resize_to_window(view, CROP).shape[-2:]
        expected += len(window_anchors(h, CROP, 48)) * len(window_anchors(w, CROP, 48))
    assert sum(s[0] for s in stub.window_shapes) == expected
    assert max(s[0] for s in stub.window_shapes) == 5


def test_distributed_sampler_padding_is_not_scored(synthetic_root):
    # 8 images on 3 ranks: the sampler pads to 9; the padded item must not count twice.
    counts = []
    for rank in range(3):
        loader = val_loader(synthetic_root, sampler=DistributedSampler(
            build_dataset("synthetic", "val", im_size=128, crop_size=CROP, normalization="vit",
                          data_root=synthetic_root), num_replicas=3, rank=rank, shuffle=False))
        assert len(loader) == 3
        scores = evaluate_dataset(CountingStub(K), loader, n_cls=K, window_size=CROP, window_stride=CROP,
                                  device="cpu", progress=False)
        counts.append(scores["num_images"])
    assert counts == [3, 3, 2]


def test_evaluate_rejects_bad_arguments(synthetic_root):
    loader = val_loader(synthetic_root)
    with pytest.raises(ValueError, match="stride"):
        evaluate_dataset(CountingStub(K), loader, n_cls=K, window_size=CROP, window_stride=CROP + 1, device="cpu")
    with pytest.raises(ValueError, match="frac_dataset"):
        evaluate_dataset(CountingStub(K), loader, n_cls=K, window_size=CROP, window_stride=CROP, device="cpu",
                         frac_dataset=0.0)


def test_saved_images_are_palette_coloured(synthetic_root, tmp_path):
    from PIL import Image

    info = val_loader(synthetic_root).dataset.info
    out = tmp_path / "images"
    evaluate_dataset(OracleStub(K), val_loader(synthetic_root), n_cls=K, window_size=CROP, window_stride=CROP,
                     device="cpu", frac_dataset=0.125, progress=False, save_dir=out, blend=False)
    names = {d: sorted(p.name for p in (out / d).iterdir()) for d in ("input", "pred", "gt")}
    assert names["input"] == names["pred"] == names["gt"] == ["syn_val_00000.png"]
    pred = np.asarray(Image.open(out / "pred" / "syn_val_00000.png"))
    gt = np.asarray(Image.open(out / "gt" / "syn_val_00000.png"))
    label = val_loader(synthetic_root).dataset[0]["segmentation"].numpy()
    palette = np.array(info.palette, dtype=np.uint8)
    valid = label != 255
    assert np.array_equal(gt[valid], palette[label[valid]]) and np.array_equal(pred[valid], gt[valid])
    assert not list(out.rglob("*.tmp"))


# ----------------------------------------------------------------------------- settings
def _fake_model(crop, policy="policy_net"):
    return types.SimpleNamespace(crop_size=(crop, crop), reduction_method="none" if policy == "no_sharing" else "cts")


@pytest.mark.parametrize("dataset, crop, stride, im_size", [
    ("ade20k", 512, 512, 512), ("cityscapes", 768, 512, 1024), ("pascal_context", 480, 320, 520),
])
def test_reference_window_defaults(dataset, crop, stride, im_size):
    variant = {"dataset_kwargs": {"dataset": dataset, "crop_size": crop, "normalization": "vit"}}
    s = resolve_settings(variant, _fake_model(crop), dataset)
    assert (s["window_size"], s["window_stride"], s["im_size"]) == (crop, stride, im_size)


def test_image_size_defaults_to_the_training_size_on_the_training_dataset():
    variant = {"dataset_kwargs": {"dataset": "ade20k", "image_size": 640, "crop_size": 512, "normalization": "vit"}}
    assert resolve_settings(variant, _fake_model(512), "ade20k")["im_size"] == 640
    assert resolve_settings(variant, _fake_model(512), "ade20k", im_size=512)["im_size"] == 512
    # another dataset: its preset (pascal_context 520), not the training size
    assert resolve_settings(variant, _fake_model(512), "pascal_context", window_stride=320)["im_size"] == 520


def test_settings_errors():
    variant = {"dataset_kwargs": {"dataset": "ade20k", "crop_size": 512, "normalization": "vit"}}
    with pytest.raises(ValueError, match="--window-size 512"):
        resolve_settings(variant, _fake_model(512), "ade20k", window_size=640)
    with pytest.raises(ValueError, match="--window-stride"):
        resolve_settings(variant, _fake_model(512), "ade20k", window_stride=600)
    # A plain Segmenter may slide any window; the stride never exceeds it by default.
    s = resolve_settings(variant, _fake_model(512, "no_sharing"), "ade20k", window_size=384)
    assert (s["window_size"], s["window_stride"]) == (384, 384)


# ----------------------------------------------------------------------------- CLI
def test_cli_writes_reference_scores_file(synthetic_root, tmp_path):
    ckpt, model, variant = make_model_dir(tmp_path, synthetic_root)
    result = CliRunner().invoke(miou_main, [str(ckpt), "synthetic", "--frac-dataset", "0.25", "--num-workers", "0",
                                            "--save-images", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert not (ckpt.parent / "scores_ss.yml").exists()  # the full evaluation's file: not a partial one's
    scores = load_yaml(ckpt.parent / "scores_ss_frac0.25.yml")
    # the reference's keys plus the policy, the reduction and the settings that produced the scores, sorted;
    # a partial evaluation also records its fraction and the images it scored
    assert list(scores) == ["cat_iou", "dataset", "frac_dataset", "im_size", "inference", "mean_accuracy", "mean_iou",
                            "num_images", "per_class", "pixel_accuracy", "policy", "reducer", "window_size",
                            "window_stride"]
    assert (scores["frac_dataset"], scores["num_images"]) == (0.25, 2)
    assert scores["reducer"] == {"reducer": "cts", "tokens": 10, "reduction": 1 - 10 / 16, "policy": "random",
                                 "num_shared": 2, "num_notshared": 8, "random_seed": 0}
    assert scores["policy"] == {"method": "random", "num_shared": 2, "num_notshared": 8, "policynet_ckpt": None}
    trained_im_size = variant["dataset_kwargs"]["image_size"]  # the default on the training dataset
    assert (scores["dataset"], scores["im_size"], scores["window_size"], scores["window_stride"]) == (
        "synthetic", trained_im_size, CROP, 32)
    assert scores["inference"] == "single_scale" and len(scores["cat_iou"]) == K
    assert f"mean_iou: {scores['mean_iou']}" in result.output
    # per class, with the dataset's names: in the file and as a table after the scores
    names = val_loader(synthetic_root).dataset.info.class_names
    assert [c["name"] for c in scores["per_class"]] == names
    assert [c["iou"] for c in scores["per_class"]] == pytest.approx(scores["cat_iou"], nan_ok=True)
    assert all(set(c) == {"name", "iou", "acc"} for c in scores["per_class"])
    table = result.output[result.output.index("mean_iou:"):]
    assert "| Class" in table and "IoU" in table and "Acc" in table
    for name, c in zip(names, scores["per_class"]):
        assert f"| {name}" in table and f"{c['iou']:.2f}" in table

    # Defaults: window = the crop, stride = the variant's 32 (config's synthetic 128 > window).
    model.reducer.reset()
    direct = evaluate_dataset(model, val_loader(synthetic_root, im_size=trained_im_size), n_cls=K, window_size=CROP,
                              window_stride=32, window_batch_size=4, device="cpu", frac_dataset=0.25, progress=False)
    assert {k: scores[k] for k in ("mean_iou", "pixel_accuracy", "mean_accuracy")} == {
        k: direct[k] for k in ("mean_iou", "pixel_accuracy", "mean_accuracy")}
    assert sorted(p.name for p in (ckpt.parent / "images" / "pred").iterdir()) == ["syn_val_00000.png", "syn_val_00001.png"]
    assert (ckpt.parent / "images.zip").is_file()
    assert not list(ckpt.parent.rglob("*.tmp"))


def _one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_errors(synthetic_root, tmp_path, monkeypatch):
    runner = CliRunner()
    _one_line_error(runner.invoke(miou_main, [str(tmp_path / "nope.pth"), "synthetic"]), "checkpoint not found")
    result = runner.invoke(miou_main, [str(tmp_path / "nope.pth"), "imagenet"])  # a choice: a usage error
    assert result.exit_code == 2 and "'imagenet' is not one of 'ade20k'" in result.output
    result = runner.invoke(miou_main, [str(tmp_path / "nope.pth"), "synthetic", "--format", "index"])
    assert result.exit_code == 2 and "add --save-images" in result.output

    ckpt, model, variant = make_model_dir(tmp_path, synthetic_root)
    _one_line_error(runner.invoke(miou_main, [str(ckpt), "synthetic", "--data-root", str(tmp_path / "missing"),
                                              "--num-workers", "0"]), "synthetic dataset not found")
    monkeypatch.delenv("DATASET", raising=False)
    _one_line_error(runner.invoke(miou_main, [str(ckpt), "cityscapes"]), "DATASET")

    # A reference checkpoint: a bare {'model': state_dict}, so it needs variant.yml beside it.
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    torch.save({"model": model.state_dict(), "epoch": 0}, ref_dir / "checkpoint.pth")
    _one_line_error(runner.invoke(miou_main, [str(ref_dir / "checkpoint.pth"), "synthetic"]), "variant.yml")
    assert not (ref_dir / "scores_ss.yml").exists()


@pytest.mark.slow
def test_torchrun_three_ranks_match_single_process(synthetic_root, tmp_path):
    import os
    import subprocess
    import sys

    # no_sharing: deterministic per window, whichever rank runs it. 8 images on 3 ranks
    # (3 + 3 + 2, one padding item) must give the single-process scores exactly.
    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root, policy_method="no_sharing")
    args = [str(ckpt), "synthetic", "--num-workers", "0", "--device", "cpu"]
    assert CliRunner().invoke(miou_main, args).exit_code == 0
    single = load_yaml(ckpt.parent / "scores_ss.yml")
    (ckpt.parent / "scores_ss.yml").unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", "29517",
         "-m", "segm.eval.miou", *args[:-2]],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert load_yaml(ckpt.parent / "scores_ss.yml") == single
    assert proc.stdout.count("mean_iou:") == 1  # printed by rank 0 only


def test_amp_dtype_autocasts_the_forward(synthetic_root):
    seen = []

    class AmpStub(CountingStub):
        def forward(self, im):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return super().forward(im).to(torch.bfloat16)

    scores = evaluate_dataset(AmpStub(K), val_loader(synthetic_root), n_cls=K, window_size=CROP, window_stride=CROP,
                              device="cpu", amp_dtype=torch.bfloat16, frac_dataset=0.125, progress=False)
    assert seen and all(s == (True, torch.bfloat16) for s in seen)
    assert scores["num_images"] == 1


def test_saved_index_maps_are_in_the_label_space(synthetic_root, tmp_path):
    """`--format index`: pred/<name>.png alone, 8-bit single-channel train labels (synthetic keeps
    them; the benchmark datasets' mapping is tested in tests/test_label_space.py)."""
    from PIL import Image

    out = tmp_path / "images"
    evaluate_dataset(OracleStub(K), val_loader(synthetic_root), n_cls=K, window_size=CROP, window_stride=CROP,
                     device="cpu", frac_dataset=0.125, progress=False, save_dir=out, save_format="index")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == ["pred/syn_val_00000.png"]
    with Image.open(out / "pred" / "syn_val_00000.png") as im:
        assert im.mode == "L"
        pred = np.asarray(im)
    label = val_loader(synthetic_root).dataset[0]["segmentation"].numpy()
    valid = label != 255
    assert np.array_equal(pred[valid], label[valid])
    with pytest.raises(ValueError, match="save_format"):
        evaluate_dataset(OracleStub(K), val_loader(synthetic_root), n_cls=K, window_size=CROP, window_stride=CROP,
                         device="cpu", frac_dataset=0.125, progress=False, save_dir=out, save_format="rgb")


def test_cli_index_format_writes_pred_maps_and_zip(synthetic_root, tmp_path):
    import zipfile

    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root)
    result = CliRunner().invoke(miou_main, [str(ckpt), "synthetic", "--frac-dataset", "0.125", "--num-workers", "0",
                                            "--save-images", "--format", "index", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(ckpt.parent / "images.zip") as z:
        assert sorted(z.namelist()) == ["pred/", "pred/syn_val_00000.png"]
