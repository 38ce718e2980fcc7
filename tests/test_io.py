"""The one image reader (`segm.data.io.read_image`): 8-bit files exactly as OpenCV's
IMREAD_COLOR read them, deeper files scaled by one rule, EXIF orientation ignored; and data
errors raised in DataLoader workers reaching every command line as one line naming the file."""
from __future__ import annotations

import shutil
import traceback
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from segm.data.io import DataError, check_same_size, pil_to_rgb, read_image, user_message

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8)


def _opencv_color(path) -> np.ndarray:
    """What every reader of training, evaluation and policynet returned before (BGR)."""
    return cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)


def _write_8bit(d: Path) -> list[Path]:
    rgba = np.dstack([RGB, RGB[..., 0]])
    pal = Image.fromarray(RGB).convert("P")
    files = {
        "rgb.jpg": lambda p: Image.fromarray(RGB).save(p, quality=90),
        "rgb444.jpg": lambda p: Image.fromarray(RGB).save(p, quality=90, subsampling=0),
        "progressive.jpg": lambda p: Image.fromarray(RGB).save(p, progressive=True),
        "grey.jpg": lambda p: Image.fromarray(RGB[..., 0]).save(p),
        "cmyk.jpg": lambda p: Image.fromarray(RGB).convert("CMYK").save(p),
        "grey.png": lambda p: Image.fromarray(RGB[..., 0]).save(p),
        "bits.png": lambda p: Image.fromarray(RGB[..., 0] > 128).save(p),
        "la.png": lambda p: Image.fromarray(RGB[..., :2].copy(), "LA").save(p),
        "rgba.png": lambda p: Image.fromarray(rgba).save(p),
        "palette.png": lambda p: pal.save(p),
        "palette_alpha.png": lambda p: pal.save(p, transparency=3),
        "rgb.bmp": lambda p: Image.fromarray(RGB).save(p),
        "rgb.webp": lambda p: Image.fromarray(RGB).save(p, quality=80),
        "rgb.tif": lambda p: Image.fromarray(RGB).save(p),
        "rgba.tif": lambda p: Image.fromarray(rgba).save(p),
    }
    for name, write in files.items():
        write(d / name)
    return [d / name for name in files]


def test_8bit_files_read_exactly_as_before(tmp_path, synthetic_root):
    """Training, evaluation and policynet results on 8-bit files do not change; inference (PIL
    before) agrees on the synthetic dataset's JPEGs."""
    for path in _write_8bit(tmp_path):
        before = _opencv_color(path)
        assert np.array_equal(read_image(path, channel_order="bgr"), before), path.name
        rgb = read_image(path)
        assert rgb.dtype == np.uint8 and rgb.flags.c_contiguous and np.array_equal(rgb, before[..., ::-1])
    for path in sorted(Path(synthetic_root).glob("images/*/*")):
        rgb = read_image(path)
        assert np.array_equal(rgb, _opencv_color(path)[..., ::-1])
        assert np.array_equal(rgb, np.asarray(Image.open(path).convert("RGB"))), path.name


def test_deep_images_follow_one_rule(tmp_path):
    """16-bit: the high byte (not clipped to white); floats: [0, 1] intensities; int32: the
    high byte of the non-negative range. The same for files and PIL images."""
    v16 = (np.arange(30 * 40 * 3).reshape(30, 40, 3) * 53 % 65536).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), v16[..., ::-1])
    cv2.imwrite(str(tmp_path / "rgb16.tif"), v16[..., ::-1])
    cv2.imwrite(str(tmp_path / "grey16.png"), v16[..., 0])
    expected = (v16 >> 8).astype(np.uint8)
    for name, want in [("rgb16.png", expected), ("rgb16.tif", expected),
                       ("grey16.png", np.repeat(expected[..., :1], 3, 2))]:
        assert np.array_equal(read_image(tmp_path / name), want), name
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode == "I;16" and np.array_equal(pil_to_rgb(im), np.repeat(expected[..., :1], 3, 2))

    f = RNG.random((30, 40, 3)).astype(np.float32)
    f[0, :4, 0] = [0, 1, 0.5, 1 / 255]
    cv2.imwrite(str(tmp_path / "rgb_float.tif"), f[..., ::-1])
    Image.fromarray(f[..., 1], "F").save(tmp_path / "grey_float.tif")
    assert np.array_equal(read_image(tmp_path / "rgb_float.tif"), np.rint(f * 255).astype(np.uint8))
    assert read_image(tmp_path / "rgb_float.tif")[0, :4, 0].tolist() == [0, 255, 128, 1]
    grey = np.repeat(np.rint(f[..., 1:2].astype(np.float64) * 255).astype(np.uint8), 3, 2)
    assert np.array_equal(read_image(tmp_path / "grey_float.tif"), grey)
    assert np.array_equal(pil_to_rgb(Image.fromarray(f[..., 1], "F")), grey)

    i32 = (np.arange(30 * 40).reshape(30, 40) * 1_700_000).astype(np.int32)
    Image.fromarray(i32, "I").save(tmp_path / "int32.tif")
    want = np.repeat((i32 >> 23).astype(np.uint8)[..., None], 3, 2)
    assert np.array_equal(read_image(tmp_path / "int32.tif"), want)
    assert np.array_equal(pil_to_rgb(Image.fromarray(i32, "I")), want)


@pytest.mark.parametrize("values, message", [
    (np.full((8, 8), 2.0, np.float32), r"values outside \[0, 1\]"),
    (np.full((8, 8), np.nan, np.float32), r"values outside \[0, 1\]"),
    (np.full((8, 8), -3, np.int32), "negative values"),
])
def test_deep_values_without_a_meaning_are_refused(tmp_path, values, message):
    path = tmp_path / "odd.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(DataError, match=message) as e:
        read_image(path)
    assert str(path) in str(e.value) and len(str(e.value).splitlines()) == 1


def test_exif_orientation_is_ignored(tmp_path):
    """A JPEG tagged "rotate 90°" is read in its stored pixel order, as its label is (OpenCV's
    IMREAD_COLOR rotated it; PIL never did)."""
    path = tmp_path / "rotated.jpg"
    im = Image.fromarray(RGB)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(path, exif=exif)
    assert _opencv_color(path).shape == (40, 30, 3)  # what training read before
    rgb = read_image(path)
    assert rgb.shape == (30, 40, 3)
    assert np.array_equal(rgb, np.asarray(Image.open(path).convert("RGB")))


def test_size_mismatch_message_names_both_files():
    with pytest.raises(DataError) as e:
        check_same_size("a/im.jpg", (30, 40, 3), "b/im.png", (40, 30))
    message = str(e.value)
    assert message.startswith("label b/im.png is 30x40 but its image a/im.jpg is 40x30")
    assert "same stored size" in message and "EXIF orientation is ignored" in message
    check_same_size("a/im.jpg", torch.Size([30, 40]), "b/im.png", (30, 40))


# ----------------------------------------------------------------------------- worker errors
class _Failing(Dataset):
    def __init__(self, exc):
        self.exc = exc

    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise self.exc


@pytest.mark.parametrize("exc", [
    DataError("cannot decode image /data/x.jpg: the file is corrupt or not an image"),
    FileNotFoundError("image /data/y.jpg not found (listed in val.txt)"),
])
def test_user_message_unwraps_dataloader_worker_errors(exc):
    with pytest.raises(type(exc)) as caught:
        next(iter(DataLoader(_Failing(exc), num_workers=1)))
    assert str(caught.value).startswith(f"Caught {type(exc).__name__} in DataLoader worker process 0")
    assert user_message(caught.value) == str(exc)
    assert user_message(exc) == str(exc)  # the main-process case: unchanged
    assert user_message(DataError()) == "DataError"
    # The traceback's frames hold the iterator in a reference cycle; cleared, it is freed now and
    # stops its worker at once (left to the cyclic collector, see conftest.py, the stop can be lost).
    traceback.clear_frames(caught.tb)


def _broken_copy(synthetic_root, tmp_path, folder: str) -> tuple[Path, Path]:
    """A copy of the synthetic dataset whose first file in `folder` is corrupt."""
    root = tmp_path / "synthetic"
    shutil.copytree(synthetic_root, root)
    bad = sorted((root / folder).iterdir())[0]
    bad.write_bytes(b"not an image")
    return root, bad


def _free_worker_error(result) -> None:
    """Clears the frames of the error chain a CLI run ended with: the DataLoader iterator they
    hold is freed now and stops its worker at once (see the worker-error test above)."""
    exc, seen = (result.exc_info[1] if result.exc_info else None), set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _one_error_line(output: str, fragment: str) -> None:
    """click's "Error: ..." is one line at the end (progress bars may precede it on its line)."""
    assert "Traceback" not in output and "Caught" not in output and output.count("Error: ") == 1, output
    error = output[output.index("Error: "):].strip()
    assert len(error.splitlines()) == 1 and fragment in error, output


def test_eval_worker_error_is_one_line_naming_the_file(synthetic_root, tmp_path):
    from segm.eval.miou import main as miou_main
    from tests.helpers.models import make_model_dir

    root, bad = _broken_copy(synthetic_root, tmp_path, "images/validation")
    ckpt, _, _ = make_model_dir(tmp_path, root, policy_method="no_sharing")
    result = CliRunner().invoke(miou_main, [str(ckpt), "synthetic", "--data-root", str(root), "--im-size", "64",
                                            "--num-workers", "1", "--device", "cpu"])
    assert result.exit_code == 1
    _one_error_line(result.output, f"cannot decode image {bad}: the file is corrupt")
    _free_worker_error(result)


def test_bad_val_label_under_workers_keeps_the_epoch(synthetic_root, tmp_path):
    """The epoch's training is checkpointed before the evaluation that finds the bad label, and
    the error from the worker is one line naming the label."""
    from tests.helpers.train import load_ckpt, run_cli, tiny_args

    root, bad = _broken_copy(synthetic_root, tmp_path, "annotations/validation")
    log_dir = tmp_path / "run"
    result = run_cli(tiny_args(log_dir, root, "--policy-method", "no_sharing", "--batch-size", "8",
                               "--epochs", "1", "--num-workers", "1"))
    assert result.exit_code == 1
    _one_error_line(result.output, f"cannot decode label {bad}")
    _free_worker_error(result)
    ckpt = load_ckpt(log_dir)
    assert ckpt["iteration"] == 3 and ckpt["epoch"] == 0
    assert set(ckpt["train_state"]["log_record"]) == {"train_loss", "train_learning_rate", "epoch", "num_updates"}
    assert not (log_dir / "log.txt").exists() or (log_dir / "log.txt").read_text() == ""
