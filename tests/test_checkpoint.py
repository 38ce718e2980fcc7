import pytest
import torch

from segm.utils.checkpoint import CheckpointError, atomic_torch_save, safe_torch_load


def test_round_trip_and_overwrite(tmp_path):
    path = tmp_path / "checkpoint.pth"
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "n_cls": 150, "lr": [1e-3]}
    atomic_torch_save(state, path)
    loaded = safe_torch_load(path)
    assert loaded["epoch"] == 3 and loaded["lr"] == [1e-3]
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    atomic_torch_save({"epoch": 4}, path)
    assert safe_torch_load(path) == {"epoch": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # no temp file left


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom while pickling")


def test_failing_save_leaves_no_file_and_keeps_old_one(tmp_path):
    path = tmp_path / "checkpoint.pth"
    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"bad": _Unpicklable()}, path)
    assert list(tmp_path.iterdir()) == []
    atomic_torch_save({"epoch": 1}, path)
    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"bad": _Unpicklable()}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
    assert safe_torch_load(path) == {"epoch": 1}


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_torch_save({}, tmp_path / "nope" / "checkpoint.pth")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        safe_torch_load(tmp_path / "missing.pth")


def test_corrupt_files(tmp_path):
    path = tmp_path / "corrupt.pth"
    atomic_torch_save({"w": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:50])  # truncated zip
    with pytest.raises(CheckpointError, match="corrupt.pth is corrupt"):
        safe_torch_load(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt.pth is corrupt"):
        safe_torch_load(path)


class _Custom:
    pass


def test_arbitrary_objects_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"obj": _Custom()}, path)
    expected = r"pickled.pth holds objects that need arbitrary unpickling \(\S*_Custom\)"
    with pytest.raises(CheckpointError, match=expected):
        safe_torch_load(path)
