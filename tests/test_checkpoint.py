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


def _torch_write_fails(context):
    def save(obj, f):
        f.write(b"PK\x03\x04 partial")
        try:
            if context is not None:
                raise context
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    return save


@pytest.mark.parametrize("context, reason", [(OSError(28, "No space left on device"), "the disk is full"),
                                             (None, "the write failed")])
def test_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, context, reason):
    path = tmp_path / "checkpoint.pth"
    atomic_torch_save({"epoch": 1}, path)
    monkeypatch.setattr(torch, "save", _torch_write_fails(context))
    with pytest.raises(CheckpointError, match=f"cannot write {path}: {reason}"):
        atomic_torch_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
    assert safe_torch_load(path) == {"epoch": 1}


def test_corrupt_file_message_is_one_sentence_of_torch(tmp_path):
    path = tmp_path / "checkpoint.pth"
    atomic_torch_save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(path)
    assert "is corrupt or not a torch checkpoint" in str(info.value)
    assert "If you are seeing this error" not in str(info.value) and "\n" not in str(info.value)


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
    expected = r"pickled.pth contains objects that are not allowed \(\S*_Custom\) and will not be loaded"
    with pytest.raises(CheckpointError, match=expected):
        safe_torch_load(path)


class _Malicious:
    def __reduce__(self):
        import os

        return (os.system, ("echo should-never-run",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_without_torch_advice(tmp_path, protocol, capfd):
    import pickle

    path = tmp_path / "evil.pth"
    if protocol == 2:
        torch.save({"model": _Malicious()}, path)
    else:  # a raw pickle of a newer protocol, not written by torch
        path.write_bytes(pickle.dumps({"model": _Malicious()}, protocol=protocol))
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(path)
    message = str(info.value)
    assert "contains objects that are not allowed" in message and "will not be loaded" in message
    assert "weights_only" not in message and "corrupt" not in message
    out, err = capfd.readouterr()
    assert "should-never-run" not in out and "weights_only" not in err


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_respect_the_umask(tmp_path, umask):
    """mkstemp creates 0600 files; results on a shared cluster must be readable as a plain
    open() would leave them."""
    import os

    old = os.umask(umask)
    try:
        atomic_torch_save({"epoch": 1}, tmp_path / "checkpoint.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "checkpoint.pth").stat().st_mode & 0o777 == 0o666 & ~umask
