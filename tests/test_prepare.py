"""Dataset preparation scripts and the download helper, fully offline.

Archives are built in tmp with the internal layout of the real ones; the only network
traffic is to a local http.server on 127.0.0.1 (bounded, stopped by the fixture).
"""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segm.scripts import _prepare_common, prepare_ade20k, prepare_cityscapes, prepare_pcontext
from segm.scripts._prepare_common import LOCK_NAME, MARKER_NAME, PrepareError, Resource
from segm.utils.download import Checksum, ChecksumError, DownloadError, cityscapes_login, download, file_digest

RNG = np.random.default_rng(0)


# --- archive builders ------------------------------------------------------------------


def _image_bytes(size=(8, 6), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _label_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _resources_for(module_resources, folder: Path) -> tuple[Resource, ...]:
    """The module's resources with the SHA-1 digests of the test archives in `folder`."""
    return tuple(
        Resource(r.filename, r.url, Checksum("sha1", file_digest(folder / r.filename)), r.manual)
        for r in module_resources
    )


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# --- ADE20K ----------------------------------------------------------------------------


@pytest.fixture
def ade(tmp_path):
    src = tmp_path / "src_ade"
    src.mkdir()
    labels = {}
    members = {"ADEChallengeData2016/objectInfo150.txt": b"Idx\tRatio\n"}
    for split, tag, n in (("training", "train", 2), ("validation", "val", 1)):
        for i in range(1, n + 1):
            name = f"ADE_{tag}_{i:08d}"
            labels[f"{split}/{name}"] = RNG.integers(0, 151, (6, 8))
            members[f"ADEChallengeData2016/images/{split}/{name}.jpg"] = _image_bytes()
            members[f"ADEChallengeData2016/annotations/{split}/{name}.png"] = _label_bytes(labels[f"{split}/{name}"])
    _zip(src / "ADEChallengeData2016.zip", members)
    _zip(src / "release_test.zip", {
        "release_test/testing/ADE_test_00000001.jpg": _image_bytes(),
        "release_test/list.txt": b"ADE_test_00000001.jpg\n",
    })
    return src, labels, _resources_for(prepare_ade20k.RESOURCES, src)


def _check_ade_tree(root: Path, labels):
    ade = root / "ade20k"
    assert (ade / "release_test/testing/ADE_test_00000001.jpg").is_file()
    for key, arr in labels.items():
        split, name = key.split("/")
        assert (ade / f"ADEChallengeData2016/images/{split}/{name}.jpg").is_file()
        got = np.array(Image.open(ade / f"ADEChallengeData2016/annotations/{split}/{name}.png"))
        np.testing.assert_array_equal(got, arr)
    marker = json.loads((ade / MARKER_NAME).read_text())
    assert marker["dataset"] == "ade20k" and marker["entries"] == ["ADEChallengeData2016", "release_test"]
    assert not list(ade.glob(".prepare-tmp-*"))


def test_ade20k_download_dir_and_idempotent(ade, tmp_path, monkeypatch):
    src, labels, res = ade
    assert prepare_ade20k.prepare_ade20k(tmp_path / "data", download_dir=src, resources=res) is True
    _check_ade_tree(tmp_path / "data", labels)
    assert not (tmp_path / "data/ade20k/downloads").exists()  # local archives are not copied

    def boom(*a, **k):
        raise AssertionError("a prepared dataset must not be touched again")

    monkeypatch.setattr(prepare_ade20k, "extract", boom)
    monkeypatch.setattr(_prepare_common, "obtain", boom)
    assert prepare_ade20k.prepare_ade20k(tmp_path / "data", download_dir=src, resources=res) is False


def test_ade20k_cli_with_archives(ade, tmp_path, monkeypatch):
    src, labels, res = ade
    monkeypatch.setattr(prepare_ade20k, "RESOURCES", res)
    args = [str(tmp_path / "data"), "--archive", str(src / "ADEChallengeData2016.zip"),
            "--archive", str(src / "release_test.zip")]
    result = CliRunner().invoke(prepare_ade20k.main, args)
    assert result.exit_code == 0, result.output
    _check_ade_tree(tmp_path / "data", labels)
    again = CliRunner().invoke(prepare_ade20k.main, args)
    assert again.exit_code == 0 and "already prepared" in again.output


def test_ade20k_missing_archive_offline(ade, tmp_path):
    src, _, res = ade
    (src / "release_test.zip").unlink()
    result = CliRunner().invoke(prepare_ade20k.main, [str(tmp_path / "data"), "--download-dir", str(src)])
    assert result.exit_code == 1
    assert "Error: missing release_test.zip" in result.output
    assert "http://data.csail.mit.edu/places/ADEchallenge/release_test.zip" in result.output
    assert not (tmp_path / "data/ade20k/ADEChallengeData2016").exists()


def test_concurrent_runs_are_refused(ade, tmp_path):
    import fcntl

    src, _, res = ade
    root = tmp_path / "data/ade20k"
    root.mkdir(parents=True)
    with open(root / LOCK_NAME, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(PrepareError, match="another preparation of ade20k is running"):
            prepare_ade20k.prepare_ade20k(tmp_path / "data", download_dir=src, resources=res)


def test_ade20k_unexpected_archive_name(ade, tmp_path):
    src, _, res = ade
    other = _zip(tmp_path / "ADE.zip", {"x": b"1"})
    with pytest.raises(PrepareError, match="unexpected --archive ADE.zip"):
        prepare_ade20k.prepare_ade20k(tmp_path / "data", archives=[other], resources=res)


def test_ade20k_hash_mismatch(ade, tmp_path):
    src, _, res = ade
    wrong = tuple(Resource(r.filename, r.url, Checksum("sha1", "0" * 40), r.manual) for r in res)
    # a user's file is reported, not moved
    with pytest.raises(PrepareError, match=r"SHA1 of ADEChallengeData2016.zip is [0-9a-f]{40}, expected SHA1 0{40}"):
        prepare_ade20k.prepare_ade20k(tmp_path / "data", download_dir=src, resources=wrong)
    assert (src / "ADEChallengeData2016.zip").is_file()
    # a file in the tool's own downloads folder is moved aside and never trusted again
    downloads = tmp_path / "data/ade20k/downloads"
    downloads.mkdir(parents=True)
    for r in res:
        (downloads / r.filename).write_bytes((src / r.filename).read_bytes())
    with pytest.raises(PrepareError, match="moved aside"):
        prepare_ade20k.prepare_ade20k(tmp_path / "data", resources=wrong)
    assert not (downloads / "ADEChallengeData2016.zip").exists()
    assert (downloads / "ADEChallengeData2016.zip.bad").is_file()
    assert not (tmp_path / "data/ade20k" / MARKER_NAME).exists()


def test_ade20k_corrupt_archive(ade, tmp_path):
    src, _, res = ade
    downloads = tmp_path / "data/ade20k/downloads"
    downloads.mkdir(parents=True)
    data = (src / "ADEChallengeData2016.zip").read_bytes()
    (downloads / "ADEChallengeData2016.zip").write_bytes(data[: len(data) // 2])
    (downloads / "release_test.zip").write_bytes((src / "release_test.zip").read_bytes())
    no_hash = tuple(Resource(r.filename, r.url) for r in res)
    with pytest.raises(PrepareError, match=r"ADEChallengeData2016.zip is corrupt or incomplete .*moved aside"):
        prepare_ade20k.prepare_ade20k(tmp_path / "data", resources=no_hash, fetch=lambda r, d: pytest.fail())
    assert (downloads / "ADEChallengeData2016.zip.bad").is_file()
    assert not (tmp_path / "data/ade20k/ADEChallengeData2016").exists()


def test_ade20k_fetch_then_reuse_downloads(ade, tmp_path):
    src, labels, res = ade
    calls = []

    def fake_fetch(resource, dest):  # stands in for the network
        calls.append(resource.filename)
        dest.write_bytes((src / resource.filename).read_bytes())
        return dest

    assert prepare_ade20k.prepare_ade20k(tmp_path / "data", fetch=fake_fetch, resources=res)
    assert calls == ["ADEChallengeData2016.zip", "release_test.zip"]
    assert (tmp_path / "data/ade20k/downloads/release_test.zip").is_file()
    _check_ade_tree(tmp_path / "data", labels)
    # --force redoes the tree from the kept downloads, without fetching
    assert prepare_ade20k.prepare_ade20k(tmp_path / "data", fetch=fake_fetch, resources=res, force=True)
    assert len(calls) == 2
    _check_ade_tree(tmp_path / "data", labels)


def test_ade20k_interrupted_run_is_not_trusted(ade, tmp_path, monkeypatch):
    src, labels, res = ade
    real_extract = prepare_ade20k.extract
    calls = []

    def extract_then_crash(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted between the two archives
        real_extract(*a, **k)

    monkeypatch.setattr(prepare_ade20k, "extract", extract_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_ade20k.prepare_ade20k(tmp_path / "data", download_dir=src, resources=res)
    ade_root = tmp_path / "data/ade20k"
    assert [p.name for p in ade_root.iterdir()] == [LOCK_NAME]  # nothing half-built is left in place
    monkeypatch.setattr(prepare_ade20k, "extract", real_extract)

    # a hard kill: a stale temporary folder and an unmarked, incomplete tree
    (ade_root / ".prepare-tmp-dead/ADEChallengeData2016").mkdir(parents=True)
    (ade_root / "ADEChallengeData2016/images").mkdir(parents=True)
    (ade_root / "ADEChallengeData2016/images/junk.jpg").write_bytes(b"half")
    assert prepare_ade20k.prepare_ade20k(tmp_path / "data", download_dir=src, resources=res) is True
    _check_ade_tree(tmp_path / "data", labels)
    assert not (ade_root / "ADEChallengeData2016/images/junk.jpg").exists()


# --- Cityscapes ------------------------------------------------------------------------


def _poly(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


ANNOTATION = {
    "imgHeight": 12,
    "imgWidth": 16,
    "objects": [
        {"label": "road", "polygon": _poly(0, 6, 15, 11)},
        {"label": "car", "polygon": _poly(2, 2, 6, 5)},
        {"label": "cargroup", "polygon": _poly(8, 2, 10, 4)},  # not a label: drawn as car
        {"label": "person", "polygon": _poly(0, 0, 15, 11), "deleted": 1},  # skipped
        {"label": "license plate", "polygon": _poly(3, 3, 4, 4)},  # id -1: not drawn
        {"label": "polegroup", "polygon": _poly(12, 6, 13, 8)},  # a label of its own: 255
        {"label": "bicyclegroup", "polygon": _poly(12, 0, 13, 1)},
        {"label": "sky", "polygon": _poly(5, 2, 6, 3)},  # later objects paint over earlier ones
    ],
}


def _expected_train_ids():
    e = np.full((12, 16), 255, np.uint8)
    e[6:12, 0:16] = 0
    e[2:6, 2:7] = 13
    e[2:5, 8:11] = 13
    e[6:9, 12:14] = 255
    e[0:2, 12:14] = 18
    e[2:4, 5:7] = 10
    return e


def test_polygons_to_train_ids():
    got = np.array(prepare_cityscapes.polygons_to_train_ids(ANNOTATION))
    np.testing.assert_array_equal(got, _expected_train_ids())
    bad = {**ANNOTATION, "objects": [{"label": "spaceship", "polygon": _poly(0, 0, 1, 1)}]}
    with pytest.raises(PrepareError, match="unknown Cityscapes label 'spaceship'"):
        prepare_cityscapes.polygons_to_train_ids(bad)


CITIES = {"train": ["aachen", "bochum"], "val": ["frankfurt"], "test": ["berlin"]}


@pytest.fixture
def cityscapes_src(tmp_path):
    src = tmp_path / "src_cityscapes"
    src.mkdir()
    gt = {"README": b"gtFine", "license.txt": b"license"}
    left = {"README": b"leftImg8bit", "license.txt": b"license"}
    for split, cities in CITIES.items():
        for city in cities:
            for frame in ("000000_000019", "000001_000019"):
                stem = f"{city}_{frame}"
                base = f"gtFine/{split}/{city}/{stem}_gtFine_"
                gt[base + "polygons.json"] = json.dumps(ANNOTATION).encode()
                gt[base + "labelIds.png"] = _label_bytes(np.zeros((12, 16)))
                gt[base + "instanceIds.png"] = _label_bytes(np.zeros((12, 16)))
                gt[base + "color.png"] = _image_bytes((16, 12), "PNG")
                left[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = _image_bytes((16, 12), "PNG")
    _zip(src / "gtFine_trainvaltest.zip", gt)
    _zip(src / "leftImg8bit_trainvaltest.zip", left)
    return src


def _check_cityscapes_tree(root: Path):
    cs = root / "cityscapes"
    expected = _expected_train_ids()
    for split, cities in CITIES.items():
        names = [f"{c}/{c}_{f}" for c in cities for f in ("000000_000019", "000001_000019")]
        assert (cs / f"{split}.txt").read_text().splitlines() == names
        for name in names:
            assert (cs / f"leftImg8bit/{split}/{name}_leftImg8bit.png").is_file()
            label = np.array(Image.open(cs / f"gtFine/{split}/{name}_gtFine_labelTrainIds.png"))
            np.testing.assert_array_equal(label, expected)
    assert json.loads((cs / MARKER_NAME).read_text())["dataset"] == "cityscapes"


def test_cityscapes_offline_multiprocess_and_idempotent(cityscapes_src, tmp_path, monkeypatch):
    assert prepare_cityscapes.prepare_cityscapes(tmp_path / "data", nproc=2, download_dir=cityscapes_src)
    _check_cityscapes_tree(tmp_path / "data")
    monkeypatch.setattr(prepare_cityscapes, "convert_all", lambda *a: pytest.fail("converted twice"))
    assert prepare_cityscapes.prepare_cityscapes(tmp_path / "data", download_dir=cityscapes_src) is False


def test_cityscapes_interrupted_conversion(cityscapes_src, tmp_path, monkeypatch):
    real = prepare_cityscapes.convert_polygons
    done = []

    def convert_then_crash(path):
        if len(done) == 3:
            raise RuntimeError("simulated crash in the middle of the conversion")
        done.append(real(path))

    monkeypatch.setattr(prepare_cityscapes, "convert_polygons", convert_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_cityscapes.prepare_cityscapes(tmp_path / "data", nproc=1, download_dir=cityscapes_src)
    cs = tmp_path / "data/cityscapes"
    assert [p.name for p in cs.iterdir()] == [LOCK_NAME]  # the half-converted tree never reached its place
    monkeypatch.setattr(prepare_cityscapes, "convert_polygons", real)
    assert prepare_cityscapes.prepare_cityscapes(tmp_path / "data", nproc=1, download_dir=cityscapes_src)
    _check_cityscapes_tree(tmp_path / "data")


def test_cityscapes_needs_credentials_to_download(tmp_path):
    with pytest.raises(PrepareError, match="needs a Cityscapes account: pass --username/--password"):
        prepare_cityscapes.prepare_cityscapes(tmp_path / "data")


def test_cityscapes_bad_polygon_file_is_named(tmp_path):
    bad = tmp_path / "x_gtFine_polygons.json"
    bad.write_text('{"imgWidth": 4}')
    with pytest.raises(PrepareError, match="x_gtFine_polygons.json: not a valid Cityscapes polygon file"):
        prepare_cityscapes.convert_polygons(bad)


# --- Pascal-Context --------------------------------------------------------------------


@pytest.fixture
def pcontext_src(tmp_path):
    import torch

    src = tmp_path / "src_pcontext"
    src.mkdir()
    ids = ["2008_000002", "2008_000003", "2010_000001"]
    members = {f"VOCdevkit/VOC2010/JPEGImages/{i}.jpg": _image_bytes() for i in ids}
    members["VOCdevkit/VOC2010/ImageSets/Segmentation/train.txt"] = b"2008_000002\n"
    _tar(src / "VOCtrainval_03-May-2010.tar", members)
    (src / "trainval_merged.json").write_text('{"images": []}')
    labels = {i: RNG.integers(0, 60, (6, 8)) for i in ids}
    # keys are ints, values a PIL image (as PyTorch-Encoding stores them) or an array
    torch.save({2010000001: Image.fromarray(labels["2010_000001"].astype(np.uint8)),
                2008000002: Image.fromarray(labels["2008_000002"].astype(np.uint8))}, src / "train.pth")
    torch.save({2008000003: labels["2008_000003"]}, src / "val.pth")
    return src, labels


def test_pcontext_cli(pcontext_src, tmp_path, monkeypatch):
    src, labels = pcontext_src
    monkeypatch.setattr(prepare_pcontext, "RESOURCES", _resources_for(prepare_pcontext.RESOURCES, src))
    result = CliRunner().invoke(prepare_pcontext.main, [str(tmp_path / "data"), "--download-dir", str(src)])
    assert result.exit_code == 0, result.output
    voc = tmp_path / "data/pcontext/VOCdevkit/VOC2010"
    sets = voc / "ImageSets/SegmentationContext"
    assert (sets / "train.txt").read_text() == "2008_000002\n2010_000001\n"
    assert (sets / "val.txt").read_text() == "2008_000003\n"
    for image_id, arr in labels.items():
        png = Image.open(voc / f"SegmentationClassContext/{image_id}.png")
        assert png.mode == "L"
        np.testing.assert_array_equal(np.array(png), arr)
    for name in ("trainval_merged.json", "train.pth", "val.pth"):
        assert (voc / name).read_bytes() == (src / name).read_bytes()
    assert (src / "train.pth").is_file()  # the user's copy stays
    assert "Trusted-file exception" in CliRunner().invoke(prepare_pcontext.main, ["--help"]).output
    again = CliRunner().invoke(prepare_pcontext.main, [str(tmp_path / "data"), "--download-dir", str(src)])
    assert again.exit_code == 0 and "already prepared" in again.output


def test_pcontext_label_without_image(pcontext_src, tmp_path):
    import torch

    src, _ = pcontext_src
    torch.save({2011000009: np.zeros((6, 8), np.int64)}, src / "val.pth")
    with pytest.raises(PrepareError, match=r"val.pth labels 1 image\(s\) missing .* 2011_000009.jpg"):
        prepare_pcontext.prepare_pcontext(tmp_path / "data", download_dir=src,
                                          resources=_resources_for(prepare_pcontext.RESOURCES, src))
    assert not (tmp_path / "data/pcontext/VOCdevkit").exists()


def test_context_id():
    assert prepare_pcontext.context_id(2008000002) == "2008_000002"
    with pytest.raises(PrepareError, match="unexpected image id"):
        prepare_pcontext.context_id("img_1")


# --- downloads against a loopback server ---------------------------------------------

PAYLOAD = RNG.integers(0, 256, 300_000, dtype=np.uint8).tobytes()


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 5  # a stuck client cannot hold the server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        st = self.server.state
        url = urlparse(self.path)
        st["requests"].append((url.path, self.headers.get("Range")))
        if url.path == "/login":
            return self._send(200, b"<html>login</html>", [("Content-Type", "text/html"), ("Set-Cookie", "csrf=1")])
        if url.path in ("/file-handling/", "/md5-sum/"):
            name = {"1": "gtFine_trainvaltest.zip", "3": "leftImg8bit_trainvaltest.zip"}[parse_qs(url.query)["packageID"][0]]
            if "auth=ok" not in (self.headers.get("Cookie") or ""):
                return self._send(200, b"<html>please log in</html>", [("Content-Type", "text/html")])
            data = st["files"][name]
            if url.path == "/md5-sum/":
                return self._send(200, f"{hashlib.md5(data).hexdigest()}  {name}\n".encode())
            return self._send(200, data, [("Content-Type", "application/zip")])
        data = st["files"][url.path]
        rng = self.headers.get("Range")
        if rng and not st.get("ignore_range"):
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                return self._send(416, b"", [("Content-Range", f"bytes */{len(data)}")])
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if st.get("truncate"):  # announce everything, send half, hang up
            st["truncate"] = False
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def do_POST(self):
        st = self.server.state
        form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        st["requests"].append(("POST /login", form.get("username", [""])[0]))
        if form == {"username": ["user"], "password": ["secret"], "submit": ["Login"]} and "csrf=1" in (self.headers.get("Cookie") or ""):
            return self._send(302, b"", [("Location", "/"), ("Set-Cookie", "auth=ok")])
        return self._send(200, b"<html>bad credentials</html>", [("Content-Type", "text/html")])


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.state = {"requests": [], "files": {"/f.bin": PAYLOAD}}
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


SHA1 = Checksum("sha1", hashlib.sha1(PAYLOAD).hexdigest())


def test_download_full_and_checked(server, tmp_path):
    srv, url = server
    out = download(f"{url}/f.bin", tmp_path / "f.bin", checksum=SHA1, progress=False, timeout=5)
    assert out.read_bytes() == PAYLOAD and not (tmp_path / "f.bin.part").exists()
    # an existing verified file is not downloaded again
    download(f"{url}/f.bin", tmp_path / "f.bin", checksum=SHA1, progress=False, timeout=5)
    assert len(srv.state["requests"]) == 1


@pytest.mark.parametrize("ignore_range", [False, True])
def test_download_resumes_part(server, tmp_path, ignore_range):
    srv, url = server
    srv.state["ignore_range"] = ignore_range
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:100_000])
    out = download(f"{url}/f.bin", tmp_path / "f.bin", checksum=SHA1, progress=False, timeout=5)
    assert out.read_bytes() == PAYLOAD  # a server ignoring Range restarts cleanly
    assert srv.state["requests"] == [("/f.bin", "bytes=100000-")]


def test_download_interrupted_then_resumed(server, tmp_path):
    srv, url = server
    srv.state["truncate"] = True
    with pytest.raises(DownloadError, match="stopped at 150000 of 300000 bytes; run again to resume"):
        download(f"{url}/f.bin", tmp_path / "f.bin", checksum=SHA1, progress=False, timeout=5)
    assert not (tmp_path / "f.bin").exists() and (tmp_path / "f.bin.part").stat().st_size == 150_000
    download(f"{url}/f.bin", tmp_path / "f.bin", checksum=SHA1, progress=False, timeout=5)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert srv.state["requests"][-1] == ("/f.bin", "bytes=150000-")


def test_download_complete_part_416(server, tmp_path):
    srv, url = server
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD)
    download(f"{url}/f.bin", tmp_path / "f.bin", checksum=SHA1, progress=False, timeout=5)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_checksums_are_full_digests():
    """A digest prefix (32 bits for 8 hex digits) would let a forged train.pth/val.pth through to
    the unpickler: every checksum is the full digest, and a short one is refused."""
    for module in (prepare_ade20k, prepare_pcontext):
        for r in module.RESOURCES:
            assert len(r.checksum.hexdigest) == 40 and r.checksum.algorithm == "sha1", r.filename
    for algorithm, digest in [("sha1", "bf9985e9"), ("sha1", "0" * 39), ("sha1", "0" * 41), ("md5", "0" * 31),
                              ("sha1", "BF9985E9F2B064752BF6BD654D89F017C76C395A")]:
        with pytest.raises(ValueError, match=f"{algorithm.upper()} checksum is the full digest"):
            Checksum(algorithm, digest)
    full = Checksum("sha1", "bf9985e9f2b064752bf6bd654d89f017c76c395a")
    assert full.matches("BF9985E9F2B064752BF6BD654D89F017C76C395A") and not full.matches("bf9985e9")
    assert str(Checksum("md5", "0" * 32)) == "MD5 " + "0" * 32


def test_download_checksum_mismatch(server, tmp_path):
    srv, url = server
    with pytest.raises(ChecksumError, match=f"expected SHA1 {'deadbeef' * 5}; the file was moved aside"):
        download(f"{url}/f.bin", tmp_path / "f.bin", checksum=Checksum("sha1", "deadbeef" * 5), progress=False, timeout=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin.part.bad"]


def test_download_unreachable(tmp_path):
    with pytest.raises(DownloadError, match="cannot reach http://127.0.0.1:9/x"):
        download("http://127.0.0.1:9/x", tmp_path / "x", progress=False, timeout=5)


def test_cityscapes_login_and_download(server, cityscapes_src, tmp_path):
    srv, url = server
    for name in prepare_cityscapes.PACKAGES:
        srv.state["files"][name] = (cityscapes_src / name).read_bytes()
    with pytest.raises(DownloadError, match="Cityscapes login failed for user 'user'"):
        cityscapes_login("user", "wrong", base_url=url, timeout=5)
    assert prepare_cityscapes.prepare_cityscapes(
        tmp_path / "data", username="user", password="secret", nproc=1, base_url=url)
    _check_cityscapes_tree(tmp_path / "data")
    for name in prepare_cityscapes.PACKAGES:
        assert (tmp_path / f"data/cityscapes/downloads/{name}").read_bytes() == srv.state["files"][name]
    # without the session cookie the site answers a login page, which is refused
    with pytest.raises(DownloadError, match="answered with an HTML page"):
        download(f"{url}/file-handling/?packageID=1", tmp_path / "x.zip", reject_html=True, progress=False, timeout=5)


# --- the data layer reads the prepared trees ------------------------------------------


def test_prepared_trees_load_with_build_dataset(ade, cityscapes_src, pcontext_src, tmp_path):
    from segm.data import build_dataset

    data = tmp_path / "data"
    ade_src, ade_labels, ade_res = ade
    prepare_ade20k.prepare_ade20k(data, download_dir=ade_src, resources=ade_res)
    prepare_cityscapes.prepare_cityscapes(data, download_dir=cityscapes_src)
    pc_src, pc_labels = pcontext_src
    prepare_pcontext.prepare_pcontext(data, download_dir=pc_src,
                                      resources=_resources_for(prepare_pcontext.RESOURCES, pc_src))
    kw = dict(im_size=16, crop_size=16, normalization="vit")
    cases = [("ade20k", "ade20k", 2, 1), ("cityscapes", "cityscapes", 4, 2), ("pascal_context", "pcontext", 2, 1)]
    for name, folder, n_train, n_val in cases:
        train = build_dataset(name, "train", data_root=data / folder, **kw)
        val = build_dataset(name, "val", data_root=data / folder, **kw)
        assert (len(train), len(val)) == (n_train, n_val), name
        item = train[0]
        assert item["im"].shape == (3, 16, 16) and item["segmentation"].shape == (16, 16)
        seg = val[0]["segmentation"]
        if name == "cityscapes":
            expected = _expected_train_ids()
        elif name == "ade20k":  # reduce_zero_label: 0 -> 255, others - 1
            expected = ade_labels["validation/ADE_val_00000001"].astype(np.int64) - 1
            expected[expected < 0] = 255
        else:
            expected = pc_labels["2008_000003"]
        np.testing.assert_array_equal(seg.numpy(), expected)
    assert len(build_dataset("ade20k", "test", data_root=data / "ade20k", **kw)) == 1


def test_scripts_prepare_the_folders_the_data_layer_reads(tmp_path, monkeypatch):
    """The folder names come from one place (`segm.data.names`): what a script writes under
    $DATASET is what `dataset_root` and `split_layout` look for."""
    from segm.data.layout import dataset_root, split_layout
    from segm.scripts.prepare_synthetic import generate_synthetic

    monkeypatch.setenv("DATASET", str(tmp_path))
    written = generate_synthetic(tmp_path, num_train=1, num_val=1, size=32, log=lambda *a: None)["path"]
    assert dataset_root("synthetic") == written
    for split in ("train", "val"):
        assert len(list(split_layout("synthetic", written, split).img_dir.glob("*.jpg"))) == 1
    assert prepare_ade20k.LAYOUT == ["ADEChallengeData2016/images/training", "ADEChallengeData2016/images/validation",
                                     "ADEChallengeData2016/annotations/training",
                                     "ADEChallengeData2016/annotations/validation", "release_test/testing"]
    assert (prepare_pcontext.SPLITS, prepare_cityscapes.SPLITS) == (("train", "val"), ("train", "val", "test"))


@pytest.mark.parametrize("script", ["prepare_ade20k", "prepare_cityscapes", "prepare_pcontext", "prepare_synthetic"])
def test_help_imports_no_torch(script):
    """`-h` of a preparation script loads neither torch nor mmseg: the dataset names it shares
    with the data layer (`segm.data.names`, `segm.data`) need none."""
    probe = (f"import sys\nsys.argv = ['{script}', '-h']\nimport runpy\n"
             f"try:\n    runpy.run_module('segm.scripts.{script}', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('loaded:', sorted(m for m in ('torch', 'mmseg', 'mmcv') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    assert "Usage:" in res.stdout and res.stdout.splitlines()[-1] == "loaded: []", res.stdout
