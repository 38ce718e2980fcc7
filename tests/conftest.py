"""Shared fixtures.

`synthetic_root`: a small synthetic dataset generated once per session (24 train / 8 val
images, height 128, seed 0), i.e. the folder to pass as `data_root=` for dataset
`synthetic`. `dataset_env` additionally points $DATASET at its parent, so the default
roots (`$DATASET/synthetic`) work. `one_thread`: modules of tiny models opt in with
`pytestmark = pytest.mark.usefixtures("one_thread")`.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

SYNTHETIC_ARGS = dict(num_train=24, num_val=8, size=128, seed=0)


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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: on a shared 2-core machine, two spinning
    threads only contend (10–20× slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
