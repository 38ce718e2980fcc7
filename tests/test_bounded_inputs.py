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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tests.helpers.models import make_model_dir
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
    from segm.inference import main as inference

    return {"inference": inference, "miou": miou, "bench": bench, "pn_train": pn_train.main, "pn_eval": pn_eval.main}


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


@dataclass(frozen=True)
class Case:
    id: str
    command: str
    args: tuple
    fragment: str
    env: tuple = ()


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
    Case("inference-tall-image", "inference", _infer(image="{w}/tall.png"), "the image is 1×20000 pixels"),
    Case("inference-wide-image-native-size", "inference", _infer("--native-size", image="{w}/wide.png"),
         "more than 32 times"),
    # option ranges, before any work
    Case("inference-window-size-zero", "inference", _infer("--window-size", "0"), "window size 0 must be ≥ 1"),
    Case("inference-window-size-negative", "inference", _infer("--window-size", "-64"), "window size -64 must be ≥ 1"),
    Case("miou-window-size-zero", "miou", _miou("--window-size", "0"), "window size 0 must be ≥ 1"),
    Case("inference-im-size-zero", "inference", _infer("--im-size", "0"), "--im-size must be ≥ 1"),
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
         _infer("--policy-method", "content", "--num-tokens-shared", "2", "--policynet-ckpt", "{w}/policy_ok/model.pth"),
         "--policynet-ckpt"),
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
