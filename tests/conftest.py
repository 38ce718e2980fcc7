"""Shared fixtures.

`synthetic_root`: a small synthetic dataset generated once per session (24 train / 8 val
images, height 128, seed 0), i.e. the folder to pass as `data_root=` for dataset
`synthetic`. `dataset_env` additionally points $DATASET at its parent, so the default
roots (`$DATASET/synthetic`) work.

The whole run uses one intra-op thread (`one_thread`, session-wide): the models are tiny, and
on a shared 2-core machine (or two pytest-xdist workers on it) two spinning OpenMP threads per
process only contend (10–20× slower). Subprocesses the tests start inherit OMP_NUM_THREADS=1.
Tests about threads set their own count (and restore it).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Before torch is imported anywhere: this process and every subprocess start with one thread.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402

SYNTHETIC_ARGS = dict(num_train=24, num_val=8, size=128, seed=0)
# How long a DataLoader iterator waits for a worker to stop before terminating it (torch: 5 s).
WORKER_STOP_S = 0.5


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    from segm.scripts.prepare_synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("datasets")
    out = generate_synthetic(root, workers=1, log=lambda *a: None, **SYNTHETIC_ARGS)
    return out["path"]


@pytest.fixture
def dataset_env(synthetic_root, monkeypatch):
    monkeypatch.setenv("DATASET", str(synthetic_root.parent))
    return synthetic_root.parent


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the whole run (modules may still name it in `usefixtures`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def default_allocator():
    """Trainers run in this process keep glibc's defaults: `host_memory.for_training` would tell
    glibc to keep freed memory for the rest of the session (tests/test_host_memory.py checks it
    with a fake C library)."""
    from segm.utils import host_memory

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(host_memory, "for_training", lambda device_type: False)
        yield


@pytest.fixture(scope="session", autouse=True)
def prompt_dataloader_worker_stop():
    """A DataLoader iterator freed by the cyclic garbage collector (an error raised from a
    worker: the exception's traceback holds the iterator) may lose its index queue's feeder
    thread (a weakref finaliser) before its own `__del__` asks the worker to stop; the worker
    never hears it and the shutdown waits out torch's 5-s join timeout, then terminates it. That
    cost 5 s per such test, charged to whichever test the collector happened to run in. Here
    the wait is `WORKER_STOP_S`: workers that do hear the stop exit well within it, the others
    are terminated as before, only sooner. (Workers' own polling interval is unchanged.)"""
    from torch.utils.data import _utils

    before = _utils.MP_STATUS_CHECK_INTERVAL
    _utils.MP_STATUS_CHECK_INTERVAL = WORKER_STOP_S
    yield
    _utils.MP_STATUS_CHECK_INTERVAL = before
