import math

import numpy as np
import pytest
import torch
import yaml

from segm.metrics import IoUAccumulator, compute_metrics, intersect_and_union


def _mmseg_reference(preds, labels, n_cls, ignore_index=255):
    from mmseg.core.evaluation import mean_iou
    from mmseg.core.evaluation.metrics import total_intersect_and_union

    areas = total_intersect_and_union(preds, labels, n_cls, ignore_index)
    ret = mean_iou(preds, labels, n_cls, ignore_index)
    return [a.numpy() for a in areas], ret


def _random_dataset(n_cls, seed, n_images=4):
    g = np.random.default_rng(seed)
    preds, labels = [], []
    for i in range(n_images):
        h, w = 17 + 3 * i, 23 - 2 * i
        labels.append(g.integers(0, n_cls, (h, w)).astype(np.uint8))
        labels[-1][g.random((h, w)) < 0.2] = 255
        # Correlated predictions so IoUs are neither 0 nor 1.
        pred = g.integers(0, n_cls, (h, w))
        keep = g.random((h, w)) < 0.5
        pred[keep] = np.where(labels[-1][keep] == 255, 0, labels[-1][keep])
        preds.append(pred.astype(np.int64))
    return preds, labels


@pytest.mark.parametrize("n_cls, seed", [(5, 0), (19, 1)])
def test_matches_mmseg_mean_iou(n_cls, seed):
    preds, labels = _random_dataset(n_cls, seed)
    # Class n_cls - 1 absent from both maps -> NaN IoU, skipped by nanmean.
    for p, l in zip(preds, labels):
        p[p == n_cls - 1] = 0
        l[l == n_cls - 1] = 0
    (ref_i, ref_u, ref_p, ref_l), ref = _mmseg_reference(preds, labels, n_cls)

    acc = IoUAccumulator(n_cls)
    for p, l in zip(preds, labels):
        acc.update(torch.from_numpy(p), torch.from_numpy(l.astype(np.int64)))
    i, u, pa, la = acc.areas.numpy()
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(u, ref_u)
    np.testing.assert_array_equal(pa, ref_p)
    np.testing.assert_array_equal(la, ref_l)

    scores = acc.compute()
    expected = {
        "pixel_accuracy": np.round(np.nanmean(ref["aAcc"]) * 100, 2),
        "mean_accuracy": np.round(np.nanmean(ref["Acc"]) * 100, 2),
        "mean_iou": np.round(np.nanmean(ref["IoU"]) * 100, 2),
    }
    for k, v in expected.items():
        assert scores[k] == pytest.approx(float(v), abs=1e-6), k
    np.testing.assert_allclose(scores["cat_iou"], np.round(ref["IoU"] * 100, 2), atol=1e-6)
    assert math.isnan(scores["cat_iou"][-1])
    assert all(isinstance(v, float) for v in scores["cat_iou"])


def test_out_of_range_label_counts_like_mmseg_histc():
    # A non-ignored label outside [0, n_cls) is dropped from the label area only, as
    # mmseg's torch.histc does; the prediction at that pixel still counts.
    pred = np.array([[0, 1, 2], [1, 1, 0]], dtype=np.int64)
    label = np.array([[0, 7, 2], [1, 255, 7]], dtype=np.uint8)
    (ref_i, ref_u, ref_p, ref_l), _ = _mmseg_reference([pred], [label], 3)
    areas = intersect_and_union(torch.from_numpy(pred), torch.from_numpy(label.astype(np.int64)), 3)
    for got, ref in zip(areas, (ref_i, ref_u, ref_p, ref_l)):
        np.testing.assert_array_equal(got.numpy(), ref)


def test_batched_update_equals_per_image_updates():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (3, 8, 9), generator=g)
    label = torch.randint(0, 4, (3, 8, 9), generator=g)
    label[0, :2] = 255
    a, b = IoUAccumulator(4), IoUAccumulator(4)
    a.update(pred, label)
    for p, l in zip(pred, label):
        b.update(p, l)
    assert torch.equal(a.areas, b.areas)
    assert a.areas.dtype == torch.int64


def test_hand_made_case():
    # Class 0: I=2 (label 3, pred 2); class 1: I=1 (label 1, pred 2); class 2 absent.
    pred = torch.tensor([[0, 0, 1], [1, 2, 2]])
    label = torch.tensor([[0, 0, 0], [1, 255, 255]])
    acc = IoUAccumulator(3)
    acc.update(pred, label)
    i, u, p, l = acc.areas.tolist()
    assert i == [2, 1, 0] and p == [2, 2, 0] and l == [3, 1, 0] and u == [3, 2, 0]
    s = acc.compute()
    assert s["pixel_accuracy"] == 75.0  # 3 / 4
    assert s["mean_accuracy"] == round(100 * (2 / 3 + 1) / 2, 2)
    assert s["mean_iou"] == round(100 * (2 / 3 + 1 / 2) / 2, 2)
    assert s["cat_iou"][:2] == [66.67, 50.0] and math.isnan(s["cat_iou"][2])


def test_all_ignore_image_changes_nothing():
    pred = torch.tensor([[0, 1], [1, 1]])
    label = torch.tensor([[0, 1], [0, 1]])
    a, b = IoUAccumulator(2), IoUAccumulator(2)
    a.update(pred, label)
    b.update(pred, label)
    b.update(torch.randint(0, 2, (5, 6)), torch.full((5, 6), 255))
    assert torch.equal(a.areas, b.areas)
    assert a.compute() == b.compute()


def test_only_ignore_gives_nan_scores():
    acc = IoUAccumulator(3)
    acc.update(torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), 255))
    s = acc.compute()
    assert all(math.isnan(s[k]) for k in ("pixel_accuracy", "mean_accuracy", "mean_iou"))


def test_large_counts_exact():
    # float32 (mmseg's histc) would lose counts past 2**24; int64 accumulators do not.
    acc = IoUAccumulator(2)
    acc.areas[0, 0] = acc.areas[1, 0] = acc.areas[2, 0] = acc.areas[3, 0] = 2**40
    acc.update(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    assert acc.areas[0, 0].item() == 2**40 + 3


def test_cat_iou_nan_round_trips_through_yaml():
    s = compute_metrics(torch.tensor([1, 0]), torch.tensor([2, 0]), torch.tensor([1, 0]), torch.tensor([2, 0]))
    text = yaml.safe_dump({"cat_iou": s["cat_iou"]})
    back = yaml.safe_load(text)["cat_iou"]
    assert back[0] == 50.0 and math.isnan(back[1])


def test_bad_inputs():
    acc = IoUAccumulator(3)
    with pytest.raises(ValueError, match="shape"):
        acc.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="argmax"):
        acc.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="n_cls"):
        IoUAccumulator(0)


def test_all_reduce_without_process_group_is_identity():
    acc = IoUAccumulator(2)
    acc.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    before = acc.areas.clone()
    acc.all_reduce()
    assert torch.equal(acc.areas, before)


def test_per_class_accuracy_and_table():
    from segm.metrics import per_class_table

    s = compute_metrics(torch.tensor([2, 1, 0]), torch.tensor([3, 2, 0]), torch.tensor([2, 2, 0]),
                        torch.tensor([4, 1, 0]))
    assert s["cat_acc"][:2] == [50.0, 100.0] and math.isnan(s["cat_acc"][2])
    table = per_class_table(["sky", "road", "car"], s)
    lines = table.splitlines()
    assert "Class" in lines[1] and "IoU" in lines[1] and "Acc" in lines[1]
    assert "| sky " in table and "66.67" in table and "100.00" in table and "nan" in lines[-2]
