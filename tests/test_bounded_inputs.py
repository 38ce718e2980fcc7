"""Bounded work and inference at evaluation geometry (issue 21, part C).

A table of bad inputs that must end with one line, no traceback and nothing written: images
that claim too many pixels (refused from the header, before decoding), images too elongated to
segment, option values out of range (--threads, --crop-size, --window-size, --max-pixels,
--im-size), a policy network given to a policy that has none, symbolic-link loops. Beside it:
the index maps of `segm.inference` are the argmax `segm.eval.miou` scores, a folder tree is
segmented into the same tree, a full disk names the file, OpenCV stays quiet about TIFFs it reads.
"""
from __future__ import annotations

import errno
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tests.helpers.models import make_model_dir
from tests.test_bad_inputs import Case  # the bad-input table's row
from tests.helpers.train import make_policy_ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


def png_header(path: Path, width: int, height: int, body: bytes = b"\x00" * 64) -> Path:
    """A grey PNG whose header claims width×height: a few hundred bytes, whatever the size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(body))
                     + chunk(b"IEND", b""))
    return path


def _commands() -> dict:
    from policynet import eval as pn_eval, train as pn_train
    from segm.bench.cli import main as bench
    from segm.eval.miou import main as miou
    from segm.export.cli import main as export
    from segm.inference import main as inference

    return {"inference": inference, "miou": miou, "bench": bench, "pn_train": pn_train.main, "pn_eval": pn_eval.main,
            "export": export}


@pytest.fixture(scope="module")
def world(synthetic_root, tmp_path_factory):
    """A tiny run, a policy checkpoint with an unreadable record, and the images the cases name."""
    w = tmp_path_factory.mktemp("bounded")
    make_model_dir(w, synthetic_root, policy_method="no_sharing")
    (w / "policy").mkdir()
    make_policy_ckpt(w / "policy" / "model.pth")
    (w / "policy" / "config.json").write_text("{not json")
    (w / "policy_ok").mkdir()
    make_policy_ckpt(w / "policy_ok" / "model.pth")
    (w / "policy_ok" / "config.json").write_text('{"backbone": "efficientnet_lite0"}')
    (w / "huge_only").mkdir()
    png_header(w / "huge_only" / "a.png", 20000, 20000)
    png_header(w / "huge.png", 20000, 20000)
    wide = np.zeros((1, 20000), np.uint8)
    Image.fromarray(wide).save(w / "wide.png")
    Image.fromarray(wide.T.copy()).save(w / "tall.png")
    good = next((synthetic_root / "images" / "validation").iterdir())
    shutil.copy(good, w / "good.png")
    for name in ("loop", "dir_loop"):
        (w / name).mkdir()
    os.symlink("self.png", w / "loop" / "self.png")  # a link to itself
    os.symlink("..", w / "dir_loop" / "up")  # a folder that contains itself
    Image.fromarray(np.zeros((10, 100), np.uint8)).save(w / "strip.png")
    return w


def _infer(*extra, image="{w}/good.png"):
    return ("--model-path", "{w}/run/checkpoint.pth", "-i", image, "-o", "{w}/out", "--cpu", *extra)


def _miou(*extra):
    return ("{w}/run/checkpoint.pth", "synthetic", "--num-workers", "0", "--device", "cpu", *extra)


def _pn_train(*extra):
    return ("--dataset", "synthetic", "--data-root", "{root}", "--logdir", "{w}/pn_runs", "--pretrained", "none",
            "--num-workers", "0", "--device", "cpu", *extra)


LIMIT = "more than the limit of"
CASES = [
    # a pixel limit on every decoded image, before decoding
    Case("inference-huge-png", "inference", _infer(image="{w}/huge.png"), f"has 400000000 pixels, {LIMIT} 89478485"),
    Case("inference-huge-png-names-the-option", "inference", _infer(image="{w}/huge.png"), "--max-pixels N"),
    Case("inference-max-pixels-option", "inference", _infer("--max-pixels", "100"), f"{LIMIT} 100: raise it"),
    Case("inference-max-pixels-env", "inference", _infer(), f"{LIMIT} 1000: raise it",
         env=(("SEGM_MAX_PIXELS", "1000"),)),
    Case("inference-max-pixels-env-not-a-number", "inference", _infer(), "$SEGM_MAX_PIXELS must be a number",
         env=(("SEGM_MAX_PIXELS", "lots"),)),
    Case("inference-max-pixels-zero", "inference", _infer("--max-pixels", "0"), "--max-pixels must be ≥ 1"),
    Case("inference-max-pixels-negative", "inference", _infer("--max-pixels", "-3"), "--max-pixels must be ≥ 1"),
    Case("inference-huge-png-native-size", "inference", _infer("--native-size", image="{w}/huge.png"), LIMIT),
    Case("miou-max-pixels-env", "miou", _miou("--frac-dataset", "0.125"), f"{LIMIT} 1000",
         env=(("SEGM_MAX_PIXELS", "1000"),)),
    # a bound on the aspect ratio
    Case("inference-wide-image", "inference", _infer(image="{w}/wide.png"), "more than 32 times its short one"),
    Case("inference-tall-image", "inference", _infer(image="{w}/tall.png"), "tall.png is 1×20000 pixels"),
    Case("inference-wide-image-native-size", "inference", _infer("--native-size", image="{w}/wide.png"),
         "more than 32 times"),
    # option ranges, before any work
    Case("inference-window-size-zero", "inference", _infer("--window-size", "0"), "window size 0 must be ≥ 1"),
    Case("inference-window-size-negative", "inference", _infer("--window-size", "-64"),
         "window size -64 must be ≥ 1"),
    Case("miou-window-size-zero", "miou", _miou("--window-size", "0"), "window size 0 must be ≥ 1"),
    Case("inference-im-size-zero", "inference", _infer("--im-size", "0"), "--im-size must be in 1..8192, got 0"),
    Case("inference-im-size-huge", "inference", _infer("--im-size", "100000"), "--im-size must be in 1..8192"),
    Case("inference-im-size-with-native-size", "inference", _infer("--im-size", "64", "--native-size"),
         "drop --im-size"),
    Case("inference-im-size-too-small", "inference", _infer("--im-size", "1", image="{w}/strip.png"),
         "choose a larger --im-size"),
    Case("bench-threads-zero", "bench", ("--backbone", "vit_tiny_patch16_384", "--threads", "0"),
         "--threads must be ≥ 1"),
    Case("bench-threads-negative", "bench", ("--backbone", "vit_tiny_patch16_384", "--threads", "-4"),
         "--threads must be ≥ 1"),
    Case("pn-train-crop-4096", "pn_train", _pn_train("--crop-size", "4096"), "--crop-size 4096 is above 1536"),
    Case("pn-train-crop-not-multiple", "pn_train", _pn_train("--crop-size", "100"), "positive multiple of 32"),
    Case("pn-eval-crop-4096", "pn_eval", ("{w}/policy_ok/model.pth", "--dataset", "synthetic", "--data-root", "{root}",
                                          "--backbone", "efficientnet_lite0", "--crop-size", "4096"),
         "--crop-size 4096 is above 1536"),
    # clear messages
    Case("pn-eval-names-its-own-option", "pn_eval", ("{w}/policy/model.pth", "--dataset", "synthetic",
                                                     "--data-root", "{root}"), "pass --backbone explicitly"),
    Case("inference-policynet-ckpt-with-content", "inference",
         _infer("--policy-method", "content", "--num-tokens-shared", "2",
                "--policynet-ckpt", "{w}/policy_ok/model.pth"),
         "--policynet-ckpt"),
    Case("pn-eval-backbone-mismatch-names-its-own-option", "pn_eval",
         ("{w}/policy_ok/model.pth", "--dataset", "synthetic", "--data-root", "{root}", "--backbone",
          "tf_efficientnet_lite0"), "pass --backbone efficientnet_lite0"),
    Case("miou-policynet-ckpt-with-content", "miou",
         _miou("--policy-method", "content", "--num-tokens-shared", "2", "--policynet-ckpt", "{w}/policy_ok/model.pth"),
         "only used with --policy-method policy_net, not content"),
    Case("inference-policy-backbone-with-random", "inference",
         _infer("--policy-method", "random", "--num-tokens-shared", "2", "--policy-backbone", "efficientnet_lite0"),
         "only used with --policy-method policy_net, not random"),
    Case("export-policynet-ckpt-with-content", "export",
         ("{w}/run/checkpoint.pth", "{w}/m.onnx", "--policy-method", "content", "--num-tokens-shared", "2",
          "--policynet-ckpt", "{w}/policy_ok/model.pth"), "only used with --policy-method policy_net"),
    Case("inference-max-pixels-env-zero", "inference", _infer(), "must be ≥ 1, got 0",
         env=(("SEGM_MAX_PIXELS", "0"),)),
    Case("inference-max-pixels-env-folder", "inference", _infer(image="{w}/huge_only"),
         "$SEGM_MAX_PIXELS must be a number of pixels, got 'lots'", env=(("SEGM_MAX_PIXELS", "lots"),)),
    Case("inference-folder-of-one-huge-png", "inference", _infer(image="{w}/huge_only"),
         "1 of 1 images could not be read: a.png"),
    # symbolic-link loops are named, not skipped
    Case("inference-symlink-loop", "inference", _infer(image="{w}/loop"), "self.png"),
    Case("inference-folder-loop", "inference", _infer(image="{w}/dir_loop"), "up"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_and_writes_nothing(case, world, synthetic_root, monkeypatch):
    for key, value in case.env:
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(world)
    args = [a.format(w=world, root=synthetic_root) for a in case.args]
    before = sorted(p.relative_to(world) for p in world.rglob("*") if not p.is_symlink())
    result = CliRunner().invoke(_commands()[case.command], args)
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if "Error: " in line]  # after a progress bar too
    assert len(errors) == 1 and case.fragment in errors[0], result.output
    assert sorted(p.relative_to(world) for p in world.rglob("*") if not p.is_symlink()) == before


# ----------------------------------------------------------------------------- evaluation geometry
def _run_at_im_size(tmp_path, synthetic_root, policy_method: str, im_size: int) -> Path:
    """A tiny run whose recorded training size is `im_size`: evaluation resizes the 128-high
    validation images, so its maps differ from the native-size ones."""
    from segm.config import load_yaml
    from segm.model.factory import write_variant

    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root, policy_method=policy_method)
    variant = load_yaml(ckpt.parent / "variant.yml")
    variant["dataset_kwargs"]["image_size"] = im_size
    write_variant(variant, ckpt.parent)
    return ckpt


@pytest.mark.parametrize("policy_method", ["no_sharing", "content"])
def test_index_maps_are_the_argmax_evaluation_scores(policy_method, synthetic_root, tmp_path, monkeypatch):
    """`segm.inference --format index` on the validation images writes, bit for bit, the argmax
    `segm.eval.miou` accumulates into its scores for the same images."""
    from segm.eval import evaluate
    from segm.eval.miou import evaluate_checkpoint
    from segm.inference import main as inference

    ckpt = _run_at_im_size(tmp_path, synthetic_root, policy_method, 96)
    scored = []
    update = evaluate.IoUAccumulator.update

    def spy(self, pred, label):
        scored.append(pred.cpu().numpy().astype(np.uint8))
        return update(self, pred, label)

    monkeypatch.setattr(evaluate.IoUAccumulator, "update", spy)
    scores = evaluate_checkpoint(ckpt, "synthetic", data_root=synthetic_root, window_batch_size=2, num_workers=0,
                                 device="cpu", progress=False)
    assert scores["settings"]["im_size"] == 96 and len(scored) == 8
    val = synthetic_root / "images" / "validation"
    out = tmp_path / "pred"
    result = CliRunner().invoke(inference, ["--model-path", str(ckpt), "-i", str(val), "-o", str(out), "--cpu",
                                            "--format", "index", "--window-batch-size", "2"])
    assert result.exit_code == 0, result.output
    written = [np.asarray(Image.open(out / f"{p.stem}.png")) for p in sorted(val.iterdir())]
    assert [w.shape for w in written] == [s.shape for s in scored]  # the images' own sizes
    assert all(np.array_equal(w, s) for w, s in zip(written, scored))
    native = tmp_path / "native"
    result = CliRunner().invoke(inference, ["--model-path", str(ckpt), "-i", str(val), "-o", str(native), "--cpu",
                                            "--format", "index", "--native-size", "--window-batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert not all(np.array_equal(np.asarray(Image.open(native / f"{p.stem}.png")), s)
                   for p, s in zip(sorted(val.iterdir()), scored))  # the geometry matters here


def test_evaluation_views_are_the_pipelines(synthetic_root):
    """`evaluation_views` builds the views the evaluation pipeline builds, bit for bit: single
    scale, flipped, and the 12 multi-scale views (the unscaled pair moved first)."""
    import torch

    from segm.data import build_dataset
    from segm.data.io import read_image
    from segm.inference import evaluation_views

    kw = dict(im_size=96, crop_size=64, normalization="deit", data_root=synthetic_root)
    single = build_dataset("synthetic", "val", **kw)[3]["im"]
    multi = build_dataset("synthetic", "val", multiscale=True, **kw)
    image = read_image(multi.image_path(3))
    multi = multi[3]["im"]
    unscaled_first = [4, 5, 0, 1, 2, 3, *range(6, 12)]  # ratios 0.5, 0.75, 1.0, ...; each plain, then mirrored
    for options, expected in (({}, single), (dict(flip=True), multi[4:6]),
                              (dict(multiscale=True), [multi[i] for i in unscaled_first])):
        views, metas = evaluation_views(image, "deit", (96, 4), "cpu", **options)
        assert len(views) == len(expected) and [m["flip"] for m in metas] == [False, True] * (len(views) // 2) or (
            len(views) == 1)
        for view, want in zip(views, expected):
            assert view.shape == want.shape and torch.equal(view, want), options


# ----------------------------------------------------------------------------- folder trees
def test_a_folder_tree_is_segmented_into_the_same_tree(world, tmp_path):
    """`-i leftImg8bit/val` with one folder per city: every image below it, each result under
    its relative path; a symbolic-link loop inside is named and the run exits 1 after the rest."""
    from segm.inference import main as inference

    split = tmp_path / "leftImg8bit" / "val"
    for rel in ("aachen/a_000.png", "bonn/b_000.png", "bonn/b_001.jpg", "bonn/night/b_002.png"):
        (split / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.open(world / "good.png").save(split / rel)
    (split / "bonn" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    args = ["--model-path", str(world / "run" / "checkpoint.pth"), "-i", str(split), "-o", str(out), "--cpu",
            "--format", "index"]
    result = CliRunner().invoke(inference, args)
    assert result.exit_code == 0, result.output
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == ["aachen/a_000.png", "bonn/b_000.png", "bonn/b_001.png", "bonn/night/b_002.png"]
    inside = split / "pred"  # an output folder inside the input: its results are not inputs of a second run
    for _ in range(2):
        result = CliRunner().invoke(inference, [*args[:-2], "-o", str(inside)])
        assert result.exit_code == 0 and "wrote 4 image(s)" in result.output, result.output
    shutil.rmtree(inside)
    os.symlink("loop.png", split / "bonn" / "loop.png")
    os.symlink("../..", split / "bonn" / "night" / "back")
    result = CliRunner().invoke(inference, [*args[:-2], "-o", str(tmp_path / "again")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.splitlines()[-1] == "Error: 2 of 6 images could not be read: bonn/loop.png, bonn/night/back"
    assert "a symbolic-link loop" in result.output
    assert len(list((tmp_path / "again").rglob("*.png"))) == 4  # the others are written


def test_a_folder_tree_clash_is_refused_before_work(world, tmp_path):
    from segm.inference import main as inference

    (tmp_path / "in" / "x").mkdir(parents=True)
    for name in ("x/a.png", "x/a.jpg"):
        Image.open(world / "good.png").save(tmp_path / "in" / name)
    result = CliRunner().invoke(inference, ["--model-path", str(world / "run" / "checkpoint.pth"), "-i",
                                            str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--cpu"])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and last.endswith("would both be written as x/a.png: rename one"), result.output
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- faults and readers
def test_a_full_disk_during_inference_names_the_file(world, tmp_path, monkeypatch):
    from segm.inference import main as inference

    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "out"
    result = CliRunner().invoke(inference, ["--model-path", str(world / "run" / "checkpoint.pth"), "-i",
                                            str(world / "good.png"), "-o", str(out), "--cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (f"Error: cannot write {out / 'good.png'}: the disk is full "
                                                      "(no space left on device)")


def test_the_pixel_limit_is_checked_before_decoding(world, tmp_path, monkeypatch):
    from segm.data import io

    def no_decoding(buf):
        raise AssertionError("decoded")

    monkeypatch.setattr(io, "_decode", no_decoding)
    with pytest.raises(io.DataError, match=r"huge.png has 400000000 pixels, more than the limit of 89478485"):
        io.read_image(world / "huge.png")
    with pytest.raises(io.DataError, match=r"label .*huge.png has 400000000 pixels"):
        io.read_label(str(world / "huge.png"), 10, reduce_zero_label=False)
    png_header(tmp_path / "big.png", 10000, 9000)  # under PIL's hard limit, over ours
    with pytest.raises(io.DataError, match=r"big.png is 10000×9000 = 90000000 pixels, more than the limit of 8947"):
        io.read_image(tmp_path / "big.png", max_pixels=None)


def test_the_limit_can_be_raised(world, tmp_path, monkeypatch):
    from segm.data import io

    pair = png_header(tmp_path / "pair.png", 300, 200, body=b"\x00" * 301 * 200)
    with pytest.raises(io.DataError, match="more than the limit of 59999"):
        io.read_image(pair, max_pixels=59999)
    assert io.read_image(pair, max_pixels=60000).shape == (200, 300, 3)
    monkeypatch.setenv("SEGM_MAX_PIXELS", "59999")
    with pytest.raises(io.DataError, match="more than the limit of 59999"):
        io.read_label(str(pair), 10, reduce_zero_label=False)
    monkeypatch.setenv("SEGM_MAX_PIXELS", "500000000")  # above PIL's own guard: the header still says how many
    with pytest.raises(io.DataError, match="cannot decode image"):  # within the limit: decoded (the body is short)
        io.read_image(world / "huge.png")


def test_a_pil_image_is_checked_before_it_is_decoded(world, synthetic_root, tmp_path):
    """`segm.predict` on an opened (not yet loaded) PIL image of too many pixels, and on an
    image too elongated to segment: one error, nothing decoded or allocated."""
    import warnings

    import segm
    from segm.data.io import DataError

    _, model, variant = make_model_dir(tmp_path, synthetic_root, policy_method="no_sharing")
    png_header(tmp_path / "big.png", 10000, 9000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL's own warning, at open
        with Image.open(tmp_path / "big.png") as im:
            with pytest.raises(DataError, match="is 10000×9000 = 90000000 pixels, more than the limit"):
                segm.predict(model, im, variant=variant)
    for shape in ((1, 20000), (20000, 1, 3), (10, 330)):
        with pytest.raises(ValueError, match="more than 32 times its short one"):
            segm.predict(model, np.zeros(shape, np.uint8), variant=variant)
    assert segm.predict(model, np.zeros((10, 320), np.uint8), variant=variant).shape == (10, 320)


def test_opencv_is_quiet_about_tiffs_it_reads(tmp_path, capfd):
    """A 32-bit TIFF fails OpenCV's colour read and is read unchanged: no decoder noise on stderr."""
    from segm.data.io import read_image

    Image.fromarray(np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30), "F").save(tmp_path / "f.tif")
    Image.fromarray(np.arange(600, dtype=np.int32).reshape(20, 30) << 20, "I").save(tmp_path / "i.tif")
    import cv2

    level = cv2.utils.logging.getLogLevel()
    capfd.readouterr()
    for name in ("f.tif", "i.tif"):
        assert read_image(tmp_path / name).shape == (20, 30, 3)
    assert capfd.readouterr().err == ""
    assert cv2.utils.logging.getLogLevel() == level  # OpenCV's own setting is left as it was
