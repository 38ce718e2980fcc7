"""Index maps in a dataset's label space (`segm.data.label_space`): written as 8-bit PNGs, they
read back to the train labels they came from."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segm.data import dataset_info
from segm.data.io import read_label
from segm.data.label_space import to_label_space
from segm.data.cityscapes_labels import LABELS
from segm.visualize import save_png


def _all_labels(n_cls: int) -> np.ndarray:
    """Every train label, in a (H, W) map."""
    return np.arange(n_cls, dtype=np.int64).repeat(3).reshape(n_cls, 3)


def _write_index_png(labels, dataset, path) -> np.ndarray:
    save_png(to_label_space(labels, dataset), path)
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == labels.shape[::-1] and not im.info.get("transparency")
        return np.asarray(im)


def test_ade20k_is_train_label_plus_one_and_reads_back(tmp_path):
    info = dataset_info("ade20k")
    labels = _all_labels(info.n_cls)
    values = _write_index_png(labels, "ade20k", tmp_path / "ade.png")
    assert values.min() == 1 and values.max() == 150 and np.array_equal(values.astype(np.int64) - 1, labels)
    back = read_label(str(tmp_path / "ade.png"), info.n_cls, reduce_zero_label=True)
    assert np.array_equal(back, labels)  # the loader's reduce_zero_label undoes it


def test_cityscapes_label_ids_map_back_through_the_official_table(tmp_path):
    labels = _all_labels(19)
    values = _write_index_png(labels, "cityscapes", tmp_path / "city.png")
    id_to_train = {label_id: train_id for label_id, train_id in LABELS.values() if label_id >= 0}
    assert np.array_equal(np.vectorize(id_to_train.get)(values), labels)
    assert values[0, 0] == 7 and values[13, 0] == 26 and values[18, 0] == 33  # road, car, bicycle


@pytest.mark.parametrize("dataset", ["pascal_context", "pcontext", "synthetic", "custom", None])
def test_other_datasets_keep_train_labels(tmp_path, dataset):
    labels = _all_labels(60)
    values = _write_index_png(labels, dataset, tmp_path / "pc.png")
    assert np.array_equal(values, labels)
    if dataset == "pascal_context":
        back = read_label(str(tmp_path / "pc.png"), 60, reduce_zero_label=False)
        assert np.array_equal(back, labels)


def test_ignore_and_errors():
    assert to_label_space(np.array([[255]]), "ade20k")[0, 0] == 0
    assert to_label_space(np.array([[255]]), "cityscapes")[0, 0] == 0  # unlabeled
    with pytest.raises(ValueError, match="label 150 is not a class of dataset ade20k"):
        to_label_space(np.array([[150]]), "ade20k")
    with pytest.raises(ValueError, match="label 19 is not a class of dataset cityscapes"):
        to_label_space(np.array([[19]]), "cityscapes")
    with pytest.raises(ValueError, match="0..255"):
        to_label_space(np.array([[256]]), "pascal_context")
