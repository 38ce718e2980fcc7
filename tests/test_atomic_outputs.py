"""Outputs that appear whole or not at all, and runs that never overwrite each other (issue 21,
part B): the ONNX sidecar checked field by field, against itself and against its graph (bound
by the graph's SHA-256), the exported pair written as one, `atomic_write`'s errors and modes,
the log folder's lock, and partial evaluations in their own scores file. Every bad case ends
with a non-zero exit and one line, no traceback, and changes nothing on disk."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tests.test_export import checkpoint_at_crop

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


def _snapshot(folder: Path) -> dict:
    """Every entry under `folder`: its mtime and, for files, a digest of the content."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.is_file() and hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*"))}


def _one_line_failure(result, fragment: str, *, after_progress: bool = False) -> str:
    """The one error line of a command that must fail; asserts there is nothing else (but the
    progress lines of a command that failed in the middle, with `after_progress`)."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"  # else: a traceback
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    if after_progress:
        lines = [ln for ln in lines if ln.startswith(("Error", "Traceback"))]
    if result.exit_code == 2:  # a usage error: click's usage header, then the line
        lines = [ln for ln in lines if not ln.startswith(("Usage: ", "Try '"))]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two exports of the same architecture (content policy, batch 2) with different weights:
    {"a": a.onnx, "b": b.onnx, "data_root": the private path in their variants}. Each export
    costs seconds; every test copies them."""
    from segm.export.cli import main as export_cli

    root = tmp_path_factory.mktemp("pair")
    out = {}
    for name, seed, check in (("a", 0, []), ("b", 1, ["--no-check"])):
        ckpt = checkpoint_at_crop(root / f"run_{name}", "content", seed=seed)
        res = CliRunner().invoke(export_cli, [str(ckpt), str(root / f"{name}.onnx"), *check])
        assert res.exit_code == 0, res.output
        out[name] = root / f"{name}.onnx"
    out["ckpt"] = root / "run_a" / "checkpoint.pth"
    out["data_root"] = root / "run_a" / "data"
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(np.full((128, 128, 3), 90, np.uint8)).save(folder / "a.png")
    return folder


def _copy_pair(pair, folder: Path, graph: str = "a", side: str = "a") -> Path:
    """`folder/m.onnx` + `m.json`, copied from the fixture's exports."""
    shutil.copy(pair[graph], folder / "m.onnx")
    shutil.copy(pair[side].with_suffix(".json"), folder / "m.json")
    return folder / "m.onnx"


# ----------------------------------------------------------------------------- the sidecar, checked
def _edit(fn: Callable[[dict], None]):
    def edit(side: dict):
        fn(side)
        return side
    return edit


def _set(where: str, value):
    """An edit setting the (dotted) field `where` to `value`."""
    def fn(side):
        *parents, last = where.split(".")
        for key in parents:
            side = side[key]
        side[last] = value
    return _edit(fn)


def _delete(where: str):
    def fn(side):
        *parents, last = where.split(".")
        for key in parents:
            side = side[key]
        del side[last]
    return _edit(fn)


def _old_format(side, keep_variant=True):
    side["format"] = "segm-cts-onnx/1"
    del side["graph_sha256"], side["input"]
    if keep_variant:
        side["variant"] = {"dataset_kwargs": {"data_root": "/home/someone/data"}}
    return side


def _reducer_none(side):
    side.update(reducer={"reducer": "none", "tokens": 64, "reduction": 0.0}, policy="no_sharing", num_shared=0,
                num_notshared=64)


def _more_shared(side):
    side["reducer"].update(num_shared=7, num_notshared=36, tokens=43, reduction=1 - 43 / 64)
    side.update(num_shared=7, num_notshared=36)


def _batch_3(side):
    side["batch_size"] = 3
    side["input"]["shape"][0] = 3
    for spec in side["outputs"].values():
        spec["shape"][0] = 3


def _n_cls_11(side):
    side["n_cls"] = 11
    side["outputs"]["logits"]["shape"][1] = 11


def _reordered(side):
    side["outputs"] = {k: side["outputs"][k] for k in ("logits", "scores", "shared_idx")}


@dataclass(frozen=True)
class SidecarCase:
    id: str
    edit: Callable | str | None  # a dict edit, raw text for m.json, None: no m.json
    fragment: str
    graph: str = "a"


def _raw(text):
    return text


SIDECAR_CASES = [
    SidecarCase("missing-input", _delete("input"), "m.json: field input (the graph's input) is missing"),
    SidecarCase("old-format-with-variant", _old_format, "field format is \"segm-cts-onnx/1\", not 'segm-cts-onnx/2'"),
    SidecarCase("old-format-without-variant-or-input", lambda s: _old_format(s, keep_variant=False),
                "field format is \"segm-cts-onnx/1\""),
    SidecarCase("private-variant", _set("variant", {"dataset_kwargs": {"data_root": "/home/someone"}}),
                "m.json: field variant is not a field of this format"),
    SidecarCase("missing-digest", _delete("graph_sha256"), "field graph_sha256 (the SHA-256 of the .onnx"),
    SidecarCase("digest-not-hex", _set("graph_sha256", "abc"), "graph_sha256 (the SHA-256 of the .onnx file's bytes) "
                "must be 64 lowercase hexadecimal digits"),
    SidecarCase("digest-of-another-graph", _set("graph_sha256", "0" * 64), "are not from the same export"),
    SidecarCase("graph-of-another-export", None, "are not from the same export", graph="b"),
    SidecarCase("n-cls-a-string", _set("n_cls", "10"), "field n_cls (the number of classes) must be a positive integer"),
    SidecarCase("n-cls-against-logits", _set("n_cls", 11), "field outputs.logits"),
    SidecarCase("n-cls-against-the-graph", _edit(_n_cls_11), "field outputs.logits [2, 11, 128, 128] (float32) is not "
                "m.onnx's [2, 10, 128, 128]"),
    SidecarCase("crop-one-number", _set("crop", [128]), "field crop (the input's size) must be [height, width]"),
    SidecarCase("crop-against-reducer", _set("crop", [64, 64]), "field reducer.tokens 49 exceeds the 16 patches"),
    SidecarCase("crop-not-a-multiple", _set("crop", [120, 120]), "field crop [120, 120] is not a multiple of patch_size"),
    SidecarCase("patch-size-zero", _set("patch_size", 0), "field patch_size (the patch size) must be a positive integer"),
    SidecarCase("normalization-unknown", _set("normalization.name", "imagenet"), "field normalization.name"),
    SidecarCase("normalization-stats", _set("normalization.mean", [0.485, 0.456, 0.406]),
                "field normalization.mean [0.485, 0.456, 0.406] is not normalisation 'vit''s"),
    SidecarCase("normalization-std-zero", _set("normalization.std", [0.5, 0, 0.5]), "field normalization.std"),
    SidecarCase("normalization-in-graph", _set("normalization.in_graph", True), "field normalization.in_graph"),
    SidecarCase("normalization-unknown-key", _set("normalization.scale", 255), "field normalization.scale is not a"),
    SidecarCase("input-name", _set("input.name", "image"), "field input.name 'image' is not m.onnx's input 'im'"),
    SidecarCase("input-batch", _set("input.shape", [3, 3, 128, 128]), "field input.shape"),
    SidecarCase("batch-against-the-graph", _edit(_batch_3), "field input.shape [3, 3, 128, 128] (float32) is not "
                "m.onnx's [2, 3, 128, 128]"),
    SidecarCase("input-dtype", _set("input.dtype", "float16"), "field input.dtype"),
    SidecarCase("outputs-reordered", _edit(_reordered), "field outputs ['logits', 'scores', 'shared_idx'] are not m.onnx's"),
    SidecarCase("outputs-not-an-object", _set("outputs", ["logits"]), "field outputs (the graph's outputs, in order)"),
    SidecarCase("policy-contradicts-reducer", _set("policy", "no_sharing"), "field policy \"no_sharing\" contradicts "
                "reducer"),
    SidecarCase("num-shared-contradicts-reducer", _set("num_shared", 7), "field num_shared 7 contradicts reducer"),
    SidecarCase("reducer-none-against-outputs", _edit(_reducer_none), "contradict reducer (none): a model without "
                "reduction returns logits alone"),
    SidecarCase("reducer-s-against-outputs", _edit(_more_shared), "field outputs.shared_idx.shape [2, 5] is not [2, 7]"),
    SidecarCase("tokens-beyond-the-crop", _set("reducer.tokens", 100), "field reducer.tokens 100 exceeds the 64"),
    SidecarCase("reduction-against-tokens", _set("reducer.reduction", 0.5), "field reducer.reduction 0.5 is not"),
    SidecarCase("reduction-a-huge-integer", _set("reducer.reduction", 10 ** 400),
                "field reducer.reduction (1 − T/N) must be a finite number"),
    SidecarCase("mean-a-huge-integer", _set("normalization.mean", [10 ** 400, 0.5, 0.5]),
                "field normalization.mean (the mean of x/255) must be three finite numbers"),
    SidecarCase("dynamic-batch-contradiction", _set("dynamic_batch", True), "field dynamic_batch true contradicts"),
    SidecarCase("random-seed-negative", _set("random_seed", -1), "field random_seed"),
    SidecarCase("palette-out-of-range", _set("classes", {"names": None, "palette": [[300, 0, 0]] * 10}),
                "field classes.palette (a colour per class) must be a list of [R, G, B] colours"),
    SidecarCase("names-against-n-cls", _set("classes", {"names": ["a"], "palette": [[0, 0, 0]] * 10}),
                "field classes.names has 1 entries for n_cls 10"),
    SidecarCase("window-stride-beyond-window", _set("inference.window_stride", 256),
                "field inference.window_stride 256 exceeds the window 128"),
    SidecarCase("dataset-a-number", _set("dataset", 5), "field dataset (the training dataset)"),
    SidecarCase("dataset-unknown", _set("dataset", "imagenet"), "field dataset (the training dataset) must be null or "
                "one of"),
    SidecarCase("window-against-the-graph", _set("inference.window_size", 256),
                "field inference.window_size 256 is not the graph's input size [128, 128]"),
    SidecarCase("im-size-huge", _set("inference.im_size", 10 ** 29), "field inference.im_size (the short side images "
                "are resized to) must be null or an integer in 1..8192"),
    SidecarCase("layout-other", _set("input.layout", "NHWC, BGR"), "field input.layout"),
    SidecarCase("parity-claims-nonsense", _set("parity.min_argmax_agreement", 7),
                "field parity.min_argmax_agreement (the smallest share of equal predictions) must be a number in 0..1"),
    SidecarCase("opset-a-string", _set("opset", "20"), "field opset (the ONNX opset) must be a positive integer"),
    SidecarCase("nan-in-json", "nan", "is not valid JSON (NaN is not a JSON number)"),
    SidecarCase("not-json", "{not json", "m.json is not valid JSON"),
    SidecarCase("a-list", "[1, 2]", "m.json is not a segm.export sidecar (no field format)"),
    SidecarCase("too-large", "huge", "m.json is not a segm.export sidecar (4194306 bytes; a sidecar has"),
    SidecarCase("nested-too-deeply", "[" * 200000 + "]" * 200000, "m.json is not"),
    SidecarCase("no-sidecar", None, "no m.json beside"),
]


def _write_case(case: SidecarCase, pair, folder: Path) -> Path:
    onnx_path = _copy_pair(pair, folder, graph=case.graph)
    side_path = folder / "m.json"
    if case.id == "no-sidecar":
        side_path.unlink()
    elif case.edit == "nan":
        side_path.write_text(side_path.read_text().replace('"mean": [\n   0.5', '"mean": [\n   NaN'))
    elif case.edit == "huge":
        side_path.write_text(" " * (1 << 22) + "{}")
    elif isinstance(case.edit, str):
        side_path.write_text(case.edit)
    elif case.edit is not None:
        side_path.write_text(json.dumps(case.edit(json.loads(side_path.read_text()))))
    return onnx_path


@pytest.mark.parametrize("case", SIDECAR_CASES, ids=[c.id for c in SIDECAR_CASES])
def test_bad_sidecar_is_refused_in_one_line(case, pair, images, tmp_path):
    from segm.inference import main as inference

    onnx_path = _write_case(case, pair, tmp_path)
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(inference, ["--onnx", str(onnx_path), "-i", str(images), "-o", str(tmp_path / "out"),
                                            "--window-batch-size", "2", "--cpu"])
    _one_line_failure(result, case.fragment)
    assert _snapshot(tmp_path) == before


def test_the_top_level_normalization_is_the_one_used(pair, tmp_path):
    from segm.data.base import STATS, variant_normalization
    from segm.onnx_runtime import OnnxSegmenter

    onnx_path = _copy_pair(pair, tmp_path)
    side = json.loads((tmp_path / "m.json").read_text())
    side["normalization"].update(name="deit", **{k: list(v) for k, v in STATS["deit"].items()})
    (tmp_path / "m.json").write_text(json.dumps(side))
    assert variant_normalization(OnnxSegmenter(onnx_path).variant) == "deit"


def test_the_exported_pair_carries_no_private_path(pair):
    """Neither the sidecar nor the graph names a folder of the exporting machine: not the
    checkpoint, the data root or log folder of its variant, nor the exporter's source files."""
    side_text = pair["a"].with_suffix(".json").read_text()
    side = json.loads(side_text)
    assert not {"variant", "checkpoint"} & set(side)
    private = [str(pair["data_root"]), str(pair["ckpt"].parent), str(REPO), "data_root", "log_dir"]
    graph = pair["a"].read_bytes()
    for text in private:
        assert text not in side_text and text.encode() not in graph, text
    assert side["dataset"] == "synthetic" and side["inference"] == {"im_size": 128, "window_size": 128,
                                                                      "window_stride": 64}


def test_a_pair_loads_and_is_bound_to_its_graph(pair):
    from segm.onnx_runtime import OnnxSegmenter

    side = json.loads(pair["a"].with_suffix(".json").read_text())
    assert side["graph_sha256"] == hashlib.sha256(pair["a"].read_bytes()).hexdigest()
    model = OnnxSegmenter(pair["a"])
    assert model.variant["dataset_kwargs"] == {"dataset": "synthetic", "normalization": "vit", "crop_size": 128,
                                                "image_size": 128}


# ----------------------------------------------------------------------------- the export, written as one
@pytest.fixture
def no_export_work(monkeypatch):
    """Fails the test if the export starts its work (loading the checkpoint)."""
    def started(*args, **kwargs):
        raise AssertionError("the export started before refusing")

    monkeypatch.setattr("segm.export.cli._load", started)


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch):
    """`tmp_path/ro`, read-only (0o555); for root, whom permission bits do not stop,
    `os.access` answers about it as it does for anyone else."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real_access = os.access

        def access(path, mode, *args, **kwargs):
            if mode & os.W_OK and Path(path).resolve() == folder.resolve():
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    yield folder
    folder.chmod(0o755)


EXPORT_CASES = [
    ("read-only-folder", ["{ckpt}", "{tmp}/ro/m.onnx"], "cannot write {tmp}/ro/m.onnx: its folder {tmp}/ro: cannot "
     "write to {tmp}/ro (read-only or permission denied)"),
    ("data-root-without-dataset", ["{ckpt}", "{tmp}/m.onnx", "--data-root", "{tmp}"],
     "--data-root names the folder of --dataset: give --dataset NAME too"),
    ("dataset-without-the-check", ["{ckpt}", "{tmp}/m.onnx", "--dataset", "synthetic", "--no-check"],
     "--dataset adds validation images to the parity check, which --no-check skips"),
    ("sidecar-path-is-a-folder", ["{ckpt}", "{tmp}/folder.onnx"], "the output {tmp}/folder.json is a folder"),
    ("output-is-a-folder", ["{ckpt}", "{tmp}/dir.onnx"], "File '{tmp}/dir.onnx' is a directory"),
]


@pytest.mark.parametrize("args,fragment", [c[1:] for c in EXPORT_CASES], ids=[c[0] for c in EXPORT_CASES])
def test_bad_export_is_refused_before_the_work(args, fragment, pair, tmp_path, read_only_folder, no_export_work):
    from segm.export.cli import main as export_cli

    (tmp_path / "folder.json").mkdir()
    (tmp_path / "dir.onnx").mkdir()
    before = _snapshot(tmp_path)
    fill = dict(ckpt=pair["ckpt"], tmp=tmp_path)
    result = CliRunner().invoke(export_cli, [a.format(**fill) for a in args])
    _one_line_failure(result, fragment.format(**fill))
    assert _snapshot(tmp_path) == before


@pytest.fixture
def fast_export(pair, monkeypatch):
    """`segm.export` of the fixture's checkpoint whose graph is `b.onnx`'s bytes (no tracing)."""
    data = pair["b"].read_bytes()
    monkeypatch.setattr("segm.export.write.export_bytes", lambda model, **kw: data)
    return data


def test_full_disk_during_export_is_one_line_and_keeps_the_old_pair(pair, tmp_path, fast_export, monkeypatch):
    from segm.export.cli import main as export_cli

    out = _copy_pair(pair, tmp_path)
    before = _snapshot(tmp_path)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    result = CliRunner().invoke(export_cli, [str(pair["ckpt"]), str(out), "--no-check"])
    _one_line_failure(result, f"cannot write {out}: the disk is full (no space left on device)", after_progress=True)
    assert _snapshot(tmp_path) == before


def test_a_re_export_removes_the_temporary_files_of_an_interrupted_one(pair, tmp_path, fast_export):
    from segm.export.cli import main as export_cli
    from segm.onnx_runtime import OnnxSegmenter

    stale = [tmp_path / ".m.onnx.dead0001.tmp", tmp_path / ".m.json.dead0001.tmp"]
    kept = tmp_path / ".other.onnx.dead0001.tmp"
    for path in [*stale, kept]:
        path.write_text("torn")
    result = CliRunner().invoke(export_cli, [str(pair["ckpt"]), str(tmp_path / "m.onnx"), "--no-check"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name, "m.json", "m.onnx"]
    assert OnnxSegmenter(tmp_path / "m.onnx").batch_size == 2


# A re-export killed (SIGKILL) after the graph's rename and before the sidecar's.
_KILLED_BETWEEN_THE_TWO_RENAMES = """
import json, os, signal, sys
from pathlib import Path
from segm.export.write import write_export

real_replace = os.replace

def replace(src, dst):
    real_replace(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
out, new = Path(sys.argv[1]), Path(sys.argv[2])
write_export(out, new.read_bytes(), json.loads(new.with_suffix(".json").read_text()))
"""


def test_a_pair_torn_by_sigkill_is_refused_and_a_re_export_mends_it(pair, images, tmp_path):
    from segm.export.write import write_export
    from segm.inference import main as inference
    from segm.onnx_runtime import OnnxSegmenter

    out = _copy_pair(pair, tmp_path)
    proc = subprocess.run([sys.executable, "-c", _KILLED_BETWEEN_THE_TWO_RENAMES, str(out), str(pair["b"])],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert out.read_bytes() == pair["b"].read_bytes()  # the new graph beside the old sidecar
    assert out.with_suffix(".json").read_bytes() == pair["a"].with_suffix(".json").read_bytes()
    args = ["--onnx", str(out), "-i", str(images), "-o", str(tmp_path / "out"), "--window-batch-size", "2", "--cpu"]
    _one_line_failure(CliRunner().invoke(inference, args), "are not from the same export; re-export the checkpoint")
    assert not (tmp_path / "out").exists()
    write_export(out, pair["b"].read_bytes(), json.loads(pair["b"].with_suffix(".json").read_text()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.onnx"]  # no temporary file survives
    assert OnnxSegmenter(out).batch_size == 2


def test_setup_requires_the_torch_the_export_is_tested_with():
    """setup.py's torch floor is requirements.txt's tested torch (the ONNX export's API moved
    between releases; older ones were never tested)."""
    import re

    pinned = re.search(r"^torch==(\d+)\.(\d+)", (REPO / "requirements.txt").read_text(), re.M).groups()
    floor = re.search(r'"torch>=(\d+)\.(\d+)', (REPO / "setup.py").read_text()).groups()
    assert tuple(map(int, floor)) == tuple(map(int, pinned))


# ----------------------------------------------------------------------------- atomic_write
def _umask_from_proc() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    pytest.skip("no /proc/self/status")


def test_atomic_write_never_changes_the_umask(tmp_path, monkeypatch):
    from segm.utils.atomic import atomic_write_text

    calls = []
    real_umask = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real_umask(mask))
    atomic_write_text(tmp_path / "f.txt", "x")
    assert calls == []
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~_umask_from_proc()


def _denied_temp(real_open):
    def open_(path, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    return open_


def _full_disk(fd):
    raise OSError(errno.ENOSPC, "No space left on device")


def _rename_fails(src, dst):
    raise OSError(errno.EIO, "Input/output error", str(src), str(dst))


WRITE_FAILURES = [("create-denied", "open", _denied_temp(os.open), PermissionError),
                  ("disk-full", "fsync", _full_disk, OSError), ("rename-fails", "replace", _rename_fails, OSError)]


@pytest.mark.parametrize("name,patched,failure,kind", WRITE_FAILURES, ids=[w[0] for w in WRITE_FAILURES])
def test_atomic_write_errors_name_the_destination(name, patched, failure, kind, tmp_path, monkeypatch):
    from segm.utils.atomic import atomic_write_text
    from segm.utils.writable import write_error_message

    dest = tmp_path / "scores.yml"
    dest.write_text("old")
    monkeypatch.setattr(os, patched, failure)
    with pytest.raises(kind) as info:
        atomic_write_text(dest, "new")
    monkeypatch.undo()
    assert info.value.filename == str(dest) and ".tmp" not in str(info.value)
    assert write_error_message(info.value).startswith(f"cannot write {dest}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.yml"] and dest.read_text() == "old"


def test_atomic_write_all_writes_nothing_when_one_file_fails(tmp_path):
    from segm.utils.atomic import atomic_write_all

    a, b = tmp_path / "a.onnx", tmp_path / "a.json"
    a.write_text("old graph")
    b.write_text("old sidecar")

    def broken(f):
        raise RuntimeError("serialisation failed")

    with pytest.raises(RuntimeError):
        atomic_write_all([(a, lambda f: f.write(b"new graph"), True), (b, broken, False)])
    assert (a.read_text(), b.read_text()) == ("old graph", "old sidecar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.onnx"]


# ----------------------------------------------------------------------------- the log folder's lock
def _train_args(log_dir, root, *extra):
    from tests.helpers.train import tiny_args

    return tiny_args(log_dir, root, "--policy-method", "no_sharing", "--batch-size", "2", "--iterations", "1",
                     "--eval-freq", "0", *extra)


def _refused_while_locked(log_dir, root, holder: str) -> None:
    from segm.train.cli import main as train

    before = _snapshot(log_dir)
    result = CliRunner().invoke(train, _train_args(log_dir, root))
    _one_line_failure(result, f"{log_dir} is in use by another run (held by {holder}")
    assert "choose another --log-dir" in result.stderr
    assert _snapshot(log_dir) == before


def test_a_second_run_on_a_locked_log_dir_is_refused(synthetic_root, tmp_path):
    from segm.utils.lock import lock_folder

    log_dir = tmp_path / "run"
    with lock_folder(log_dir):
        _refused_while_locked(log_dir, synthetic_root, f"pid {os.getpid()} on host {socket.gethostname()}")


_HOLD_THE_LOCK = """
import sys, time
from segm.utils.lock import lock_folder
lock = lock_folder(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_the_lock_of_another_process_is_named_and_dies_with_it(synthetic_root, tmp_path):
    from segm.utils.lock import lock_folder

    log_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_THE_LOCK, str(log_dir)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        _refused_while_locked(log_dir, synthetic_root, f"pid {holder.pid} on host {socket.gethostname()}")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    lock_folder(log_dir).release()  # SIGKILL released it


def test_a_run_holds_the_lock_while_it_writes_and_releases_it(synthetic_root, tmp_path, monkeypatch):
    from segm.train import run as run_module
    from segm.train.cli import main as train
    from segm.utils.lock import FolderLockedError, LOCK_NAME, lock_folder

    log_dir = tmp_path / "run"
    seen = []
    real_epochs = run_module.train_epochs

    def train_epochs(run, state, **kw):
        with pytest.raises(FolderLockedError):  # held while the run writes
            lock_folder(log_dir)
        seen.append((log_dir / LOCK_NAME).read_text())
        return real_epochs(run, state, **kw)

    monkeypatch.setattr(run_module, "train_epochs", train_epochs)
    for _ in range(2):  # the second run finds the first's lock released (and its training complete)
        result = CliRunner().invoke(train, _train_args(log_dir, synthetic_root))
        assert result.exit_code == 0, result.output
    assert seen[0].startswith(f"pid {os.getpid()} on host {socket.gethostname()}, since ")
    assert "training already complete" in result.output
    lock_folder(log_dir).release()


def test_a_log_dir_written_while_the_run_started_is_not_touched(tmp_path):
    """The plan (a fresh start) was made before another run wrote a checkpoint there: under the
    lock the run sees it, refuses, and leaves it (and the lock) as they were."""
    from segm.train.options import ConfigError
    from segm.train.run_dir import _lock_and_open
    from segm.utils.lock import lock_folder

    log_dir = tmp_path / "run"
    log_dir.mkdir()
    (log_dir / "checkpoint.pth").write_bytes(b"another run's")
    with pytest.raises(ConfigError, match="holds a run"):
        _lock_and_open(log_dir, {}, None, False, (None, []))
    assert (log_dir / "checkpoint.pth").read_bytes() == b"another run's"
    lock_folder(log_dir).release()


def test_check_unlocked_writes_nothing(tmp_path):
    from segm.utils.lock import check_unlocked

    check_unlocked(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


# ----------------------------------------------------------------------------- partial evaluations
def test_a_partial_evaluation_has_its_own_scores_file(synthetic_root, tmp_path):
    """The full evaluation's scores_ss.yml is never replaced by a partial one, which records
    its fraction; with another reduction, both suffixes."""
    from segm.config import load_yaml
    from segm.eval.miou import main as miou
    from tests.helpers.models import make_model_dir

    ckpt, _, _ = make_model_dir(tmp_path, synthetic_root)
    full = ckpt.parent / "scores_ss.yml"
    full.write_text("mean_iou: 42.0  # the full evaluation's\n")
    common = [str(ckpt), "synthetic", "--num-workers", "0", "--device", "cpu", "--frac-dataset", "0.25"]
    for extra, name in (([], "scores_ss_frac0.25.yml"),
                        (["--policy-method", "content", "--num-tokens-shared", "2"], "scores_ss_content_s2_frac0.25.yml")):
        result = CliRunner().invoke(miou, [*common, *extra])
        assert result.exit_code == 0, result.output
        scores = load_yaml(ckpt.parent / name)
        assert scores["frac_dataset"] == 0.25 and scores["num_images"] == 2
    assert full.read_text() == "mean_iou: 42.0  # the full evaluation's\n"
