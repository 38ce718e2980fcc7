"""Datasets, pipelines and label spaces on tiny local folders."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from segm.data import (
    IGNORE_LABEL,
    STATS,
    DataError,
    build_dataset,
    dataset_info,
    normalization_stats,
    val_collate,
)
from segm.data import pipelines
from segm.eval.window import MULTISCALE_RATIOS

SYN = dict(im_size=64, crop_size=64, normalization="vit")


def save_image(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def rand_image(rng, h, w, c=3):
    shape = (h, w, c) if c > 1 else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


# ----------------------------------------------------------------------------- facts
def test_stats_and_rounding():
    assert STATS["vit"] == {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    assert STATS["deit"] == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    assert normalization_stats("vit") == {"mean": [127.5] * 3, "std": [127.5] * 3}
    # np.round as the reference: 0.485·255 = 123.675 → 123.68 (Python's round gives 123.67)
    assert normalization_stats("deit") == {"mean": [123.68, 116.28, 103.53], "std": [58.4, 57.12, 57.38]}
    with pytest.raises(ValueError, match="normalization"):
        normalization_stats("imagenet")


def test_builtin_class_files_match_mmseg():
    from segm.data.mmseg_compat import ADE20KDataset, CityscapesDataset, PascalContextDataset

    for name, cls, n, rzl in [
        ("ade20k", ADE20KDataset, 150, True),
        ("pascal_context", PascalContextDataset, 60, False),
        ("cityscapes", CityscapesDataset, 19, False),
    ]:
        info = dataset_info(name)
        assert info.n_cls == n and info.reduce_zero_label is rzl and info.ignore_index == IGNORE_LABEL
        assert info.class_names == list(cls.CLASSES)
        assert [list(c) for c in info.palette] == [list(c) for c in cls.PALETTE]
    assert dataset_info("pcontext") == dataset_info("pascal_context")
    assert dataset_info("pascal_context").class_names[0] == "background"
    assert dataset_info("ade20k").label_ignore_value == 0


def test_reference_pipeline_values():
    """The reference recipe: ADE20K at 512 with vit stats; Pascal-Context val scale (4160, 520)."""
    from segm.data import MAX_RATIO

    assert MAX_RATIO == {"ade20k": 4, "pascal_context": 8, "cityscapes": 2, "synthetic": 4, "custom": 4}
    train = pipelines.train_pipeline(im_size=512, crop_size=512, max_ratio=4, normalization="vit",
                                     n_cls=150, reduce_zero_label=True, ignore_value=0)
    assert [op["type"] for op in train] == [
        "CheckedLoadImageFromFile", "CheckedLoadAnnotations", "Resize", "RandomCrop", "RandomFlip",
        "PhotoMetricDistortion", "Normalize", "Pad", "DefaultFormatBundle", "Collect"]
    assert train[1]["reduce_zero_label"] is True
    assert train[2] == dict(type="Resize", img_scale=(2048, 512), ratio_range=(0.5, 2.0))
    assert train[3] == dict(type="RandomCrop", crop_size=(512, 512), cat_max_ratio=0.75)
    assert train[4] == dict(type="RandomFlip", prob=0.5)
    assert train[6] == dict(type="Normalize", mean=[127.5] * 3, std=[127.5] * 3, to_rgb=True)
    assert train[7] == dict(type="Pad", size=(512, 512), pad_val=0, seg_pad_val=255)
    assert train[9]["keys"] == ["img", "gt_semantic_seg"]
    val = pipelines.test_pipeline(im_size=520, max_ratio=8, normalization="deit")
    aug = val[1]
    assert aug["img_scale"] == (4160, 520) and aug["flip"] is False and aug["img_ratios"] == [1.0]
    assert [op["type"] for op in aug["transforms"]] == [
        "Resize", "RandomFlip", "Normalize", "ImageToTensor", "Collect"]
    assert aug["transforms"][0] == dict(type="Resize", keep_ratio=True)
    ms = pipelines.test_pipeline(im_size=512, max_ratio=4, normalization="vit", multiscale=True)[1]
    assert ms["img_ratios"] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and ms["flip"] is True


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_train_items(synthetic_root):
    ds = build_dataset("synthetic", "train", data_root=synthetic_root, **SYN)
    assert len(ds) == 24 and ds.info.n_cls == 10
    for i in range(4):
        item = ds[i]
        im, seg = item["im"], item["segmentation"]
        assert im.shape == (3, 64, 64) and im.dtype == torch.float32
        assert seg.shape == (64, 64) and seg.dtype == torch.long
        assert im.min() >= -1.0 and im.max() <= 1.0  # vit: (x − 127.5)/127.5
        assert set(seg.unique().tolist()) <= set(range(10)) | {IGNORE_LABEL}
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
    assert batch["im"].shape == (4, 3, 64, 64) and batch["segmentation"].shape == (4, 64, 64)


def test_train_pads_images_smaller_than_crop(synthetic_root):
    # im_size 16: after Resize the short side is 8..32 px < crop 64, so Pad adds 255 / 0
    ds = build_dataset("synthetic", "train", im_size=16, crop_size=64, normalization="deit",
                       data_root=synthetic_root)
    item = ds[0]
    assert item["im"].shape == (3, 64, 64)
    assert (item["segmentation"][-1] == IGNORE_LABEL).all()
    assert (item["im"][:, -1] == 0).all()  # pad_val 0 after Normalize


def test_synthetic_val_single_scale(synthetic_root):
    ds = build_dataset("synthetic", "val", data_root=synthetic_root, **SYN)
    assert len(ds) == 8
    for i in range(len(ds)):
        item = ds[i]
        (view,), (meta,) = item["im"], item["im_metas"]
        label_file = synthetic_root / "annotations" / "validation" / item["ori_filename"].replace(".jpg", ".png")
        expected = torch.from_numpy(np.array(Image.open(label_file))).long()
        assert torch.equal(item["segmentation"], expected)  # original size, no reduction
        H, W = expected.shape
        assert meta["ori_shape"] == (H, W) and meta["flip"] is False
        # Resize(keep_ratio) to (4·64, 64): the short side (height here) becomes 64
        assert view.dtype == torch.float32 and view.is_contiguous() and view.shape[1] == 64
        assert view.shape[2] == int(W * 64 / H + 0.5)


def test_synthetic_val_multiscale(synthetic_root):
    ds = build_dataset("synthetic", "val", data_root=synthetic_root, multiscale=True, **SYN)
    item = ds[0]
    assert len(item["im"]) == len(item["im_metas"]) == 12
    assert [m["flip"] for m in item["im_metas"]] == [False, True] * 6
    heights = [v.shape[1] for v in item["im"][::2]]
    assert heights == [int(64 * r) for r in MULTISCALE_RATIOS]
    for a, b in zip(item["im"][::2], item["im"][1::2]):
        assert torch.allclose(a.flip(-1), b)
    assert all(m["ori_shape"] == tuple(item["segmentation"].shape) for m in item["im_metas"])


def test_val_loader_and_collate(synthetic_root):
    ds = build_dataset("synthetic", "val", data_root=synthetic_root, **SYN)
    loader = DataLoader(ds, batch_size=1, collate_fn=val_collate, num_workers=2)
    batches = list(loader)
    assert len(batches) == 8
    assert [b["ori_filename"] for b in batches] == [ds[i]["ori_filename"] for i in range(8)]
    assert batches[0]["im"][0].dim() == 3 and batches[0]["segmentation"].dim() == 2
    with pytest.raises(ValueError, match="batch_size=1"):
        val_collate([ds[0], ds[1]])


def test_default_root_from_dataset_env(dataset_env):
    ds = build_dataset("synthetic", "val", **SYN)
    assert ds.root == dataset_env / "synthetic" and len(ds) == 8
    assert dataset_info("synthetic").class_names[0] == "sky"


# ----------------------------------------------------------------------------- ADE20K
@pytest.fixture
def ade_root(tmp_path):
    """ADE20K layout with two images per split; file labels 0 (other) and 1..150."""
    rng = np.random.default_rng(0)
    base = tmp_path / "ade20k" / "ADEChallengeData2016"
    for sub in ("training", "validation"):
        for k, (h, w) in enumerate([(40, 56), (48, 36)]):
            save_image(base / "images" / sub / f"ADE_{sub}_{k:08d}.jpg", rand_image(rng, h, w))
            label = rng.integers(0, 151, (h, w)).astype(np.uint8)
            label[:5] = 0
            label[5, :3] = [1, 150, 0]
            save_image(base / "annotations" / sub / f"ADE_{sub}_{k:08d}.png", label)
    save_image(tmp_path / "ade20k" / "release_test" / "testing" / "ADE_test_00000001.jpg", rand_image(rng, 30, 50))
    return tmp_path / "ade20k"


def test_ade20k_label_space(ade_root):
    ds = build_dataset("ade20k", "val", im_size=32, crop_size=32, normalization="vit", data_root=ade_root)
    assert len(ds) == 2
    for i in range(2):
        raw = torch.from_numpy(np.array(Image.open(ds.label_path(i)))).long()
        seg = ds[i]["segmentation"]
        assert seg.shape == raw.shape
        assert torch.equal(seg, torch.where(raw == 0, IGNORE_LABEL, raw - 1))
        assert (seg[:5] == IGNORE_LABEL).all() and seg[5, :3].tolist() == [0, 149, IGNORE_LABEL]
    train = build_dataset("ade20k", "train", im_size=32, crop_size=32, normalization="vit", data_root=ade_root)
    seg = train[0]["segmentation"]
    assert seg.shape == (32, 32) and seg.max() <= IGNORE_LABEL
    assert set(seg.unique().tolist()) <= set(range(150)) | {IGNORE_LABEL}


def test_ade20k_test_split_has_no_labels(ade_root):
    ds = build_dataset("ade20k", "test", im_size=32, crop_size=32, normalization="vit", data_root=ade_root)
    item = ds[0]
    assert len(ds) == 1 and "segmentation" not in item and item["im_metas"][0]["ori_shape"] == (30, 50)


@pytest.mark.parametrize("normalization", ["vit", "deit"])
def test_checked_loaders_equal_mmseg_loaders(ade_root, normalization):
    """Same seed → the same train crop as the plain mmseg pipeline (LoadImageFromFile,
    LoadAnnotations(reduce_zero_label=True)); val views and labels likewise."""
    import random

    from mmseg.datasets.pipelines import LoadAnnotations

    from segm.data.mmseg_compat import Compose

    kw = dict(im_size=32, crop_size=24, normalization=normalization, data_root=ade_root)
    train = build_dataset("ade20k", "train", **kw)
    ref_ops = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", reduce_zero_label=True)]
    ref = Compose(ref_ops + pipelines.train_pipeline(
        im_size=32, crop_size=24, max_ratio=4, normalization=normalization, n_cls=150,
        reduce_zero_label=True)[2:])
    for i in range(len(train)):
        for seed in range(3):
            np.random.seed(seed), random.seed(seed)
            ours = train[i]
            np.random.seed(seed), random.seed(seed)
            results = dict(img_info=train.dataset.img_infos[i], ann_info=train.dataset.get_ann_info(i))
            train.dataset.pre_pipeline(results)
            theirs = ref(results)
            assert torch.equal(ours["im"], theirs["img"].data)
            assert torch.equal(ours["segmentation"], theirs["gt_semantic_seg"].data[0].long())
    val = build_dataset("ade20k", "val", multiscale=True, **kw)
    ref_val = Compose([dict(type="LoadImageFromFile")] + pipelines.test_pipeline(
        im_size=32, max_ratio=4, normalization=normalization, multiscale=True)[1:])
    for i in range(len(val)):
        results = dict(img_info=val.dataset.img_infos[i])
        val.dataset.pre_pipeline(results)
        theirs = ref_val(results)
        ours = val[i]
        assert all(torch.equal(a, b) for a, b in zip(ours["im"], theirs["img"], strict=True))
        results = dict(ann_info=val.dataset.get_ann_info(i))
        val.dataset.pre_pipeline(results)
        gt = LoadAnnotations(reduce_zero_label=True)(results)["gt_semantic_seg"]
        assert torch.equal(ours["segmentation"], torch.from_numpy(gt).long())


def test_ade20k_default_root(ade_root, monkeypatch):
    monkeypatch.setenv("DATASET", str(ade_root.parent))
    assert len(build_dataset("ade20k", "train", im_size=32, crop_size=32, normalization="vit")) == 2


# ----------------------------------------------------------------------------- Pascal Context, Cityscapes
def write_pcontext(tmp_path):
    rng = np.random.default_rng(1)
    base = tmp_path / "pcontext" / "VOCdevkit" / "VOC2010"
    ids = {"train": ["2008_000002", "2008_000003"], "val": ["2008_000008"]}
    for split, names in ids.items():
        (base / "ImageSets" / "SegmentationContext").mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / "SegmentationContext" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for n in names:
            save_image(base / "JPEGImages" / f"{n}.jpg", rand_image(rng, 30, 40))
            label = rng.integers(0, 60, (30, 40)).astype(np.uint8)
            label[0, :2] = [0, 255]
            save_image(base / "SegmentationClassContext" / f"{n}.png", label)
    return tmp_path / "pcontext"


def write_cityscapes(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "cityscapes"
    for split in ("train", "val"):
        for city in ("aachen", "bonn"):
            stem = f"{city}_000000_000019"
            save_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rand_image(rng, 32, 64))
            label = rng.integers(0, 19, (32, 64)).astype(np.uint8)
            label[0, 0] = 255
            save_image(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", label)
    return root


def test_pascal_context_layout(tmp_path):
    root = write_pcontext(tmp_path)
    val = build_dataset("pcontext", "val", im_size=32, crop_size=32, normalization="vit", data_root=root)
    assert len(val) == 1 and val.info.n_cls == 60
    raw = torch.from_numpy(np.array(Image.open(val.label_path(0)))).long()
    assert torch.equal(val[0]["segmentation"], raw)  # background 0 stays a class
    assert val[0]["im"][0].shape[1] == 32  # img_scale (8·32, 32)
    train = build_dataset("pascal_context", "train", im_size=32, crop_size=32, normalization="vit", data_root=root)
    assert len(train) == 2 and train[1]["segmentation"].shape == (32, 32)
    with pytest.raises(ValueError, match="no test split"):
        build_dataset("pascal_context", "test", im_size=32, crop_size=32, normalization="vit", data_root=root)


def test_cityscapes_layout(tmp_path):
    root = write_cityscapes(tmp_path)
    val = build_dataset("cityscapes", "val", im_size=32, crop_size=32, normalization="vit", data_root=root)
    assert [val[i]["ori_filename"] for i in range(2)] == [
        "aachen/aachen_000000_000019_leftImg8bit.png", "bonn/bonn_000000_000019_leftImg8bit.png"]
    raw = torch.from_numpy(np.array(Image.open(val.label_path(1)))).long()
    assert torch.equal(val[1]["segmentation"], raw)
    (view,) = val[0]["im"]
    assert tuple(view.shape[1:]) == (32, 64)  # img_scale (2·32, 32) keeps 32×64


# ----------------------------------------------------------------------------- custom
def write_custom(root, rng, modes=("RGB", "L", "RGBA"), ext=".png", classes=None):
    """A custom folder: one image per mode and split, labels 0..2 with 200 as ignore."""
    for sub in ("training", "validation"):
        for k, mode in enumerate(modes):
            c = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
            save_image(root / "images" / sub / f"im{k}{ext}", rand_image(rng, 20 + 4 * k, 24, c), mode=mode)
            label = rng.integers(0, 3, (20 + 4 * k, 24)).astype(np.uint8)
            label[0] = 200
            save_image(root / "annotations" / sub / f"im{k}.png", label)
    classes = classes or {"names": ["a", "b", "c"], "ignore_index": 200}
    (root / "labels.yml").write_text(yaml.safe_dump(classes))
    return root / "labels.yml"


def test_custom_dataset_modes_and_ignore_value(tmp_path):
    root = tmp_path / "mine"
    classes = write_custom(root, np.random.default_rng(3))
    info = dataset_info("custom", data_root=root, classes_file=classes)
    assert info.n_cls == 3 and len(info.palette) == 3 and info.ignore_index == IGNORE_LABEL
    val = build_dataset("custom", "val", im_size=32, crop_size=32, normalization="vit",
                        data_root=root, classes_file=classes)
    assert len(val) == 3
    for i in range(3):  # L and RGBA images become 3-channel views
        item = val[i]
        assert item["im"][0].shape[0] == 3
        raw = torch.from_numpy(np.array(Image.open(val.label_path(i)))).long()
        assert torch.equal(item["segmentation"], torch.where(raw == 200, IGNORE_LABEL, raw))
    train = build_dataset("custom", "train", im_size=32, crop_size=48, normalization="deit",
                          data_root=root, classes_file=classes)
    for i in range(3):
        item = train[i]
        assert item["im"].shape == (3, 48, 48)
        assert set(item["segmentation"].unique().tolist()) <= {0, 1, 2, IGNORE_LABEL}


def test_custom_classes_yml_default_and_reduce_zero_label(tmp_path):
    root = tmp_path / "mine"
    write_custom(root, np.random.default_rng(4), modes=("RGB",), ext=".jpg",
                 classes={"names": ["a", "b"], "reduce_zero_label": True, "palette": [[1, 2, 3], [4, 5, 6]]})
    (root / "labels.yml").rename(root / "classes.yml")
    val = build_dataset("custom", "val", im_size=32, crop_size=32, normalization="vit", data_root=root)
    assert val.info.palette == [[1, 2, 3], [4, 5, 6]] and val.info.reduce_zero_label
    raw = torch.from_numpy(np.array(Image.open(val.label_path(0)))).long()
    raw[raw == 200] = 0  # not a valid ADE-style value: rewrite the file with 0 = ignore
    Image.fromarray(raw.numpy().astype(np.uint8)).save(val.label_path(0))
    assert torch.equal(val[0]["segmentation"], torch.where(raw == 0, IGNORE_LABEL, raw - 1))


# ----------------------------------------------------------------------------- one layout
def test_mmseg_and_policynet_read_the_same_files(ade_root, tmp_path):
    """`segm.data.layout` is the one description of the folders: the mmseg datasets (which list
    their own files) use its suffixes, and policynet pairs exactly the same files."""
    from policynet.data import list_files
    from segm.data.layout import split_layout

    custom = tmp_path / "mine"
    classes = write_custom(custom, np.random.default_rng(6), modes=("RGB", "L"), ext=".jpg")
    roots = {"ade20k": ade_root, "pascal_context": write_pcontext(tmp_path),
             "cityscapes": write_cityscapes(tmp_path), "custom": custom}
    for name, root in roots.items():
        for split in ("train", "val"):
            ds = build_dataset(name, split, im_size=32, crop_size=32, normalization="vit", data_root=root,
                               classes_file=classes if name == "custom" else None)
            layout = split_layout(name, root, split)
            if name != "custom":
                assert (ds.dataset.img_suffix, ds.dataset.seg_map_suffix) == (layout.img_suffix, layout.ann_suffix)
            pairs = [(str(im), str(label)) for im, label in list_files(name, split, root)]
            assert pairs == [(ds.image_path(i), ds.label_path(i)) for i in range(len(ds))] and pairs


# ----------------------------------------------------------------------------- bad input
def test_missing_roots_name_the_prepare_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DATASET", str(tmp_path))
    kw = dict(im_size=32, crop_size=32, normalization="vit")
    for name, cmd in [
        ("ade20k", "python -m segm.scripts.prepare_ade20k $DATASET"),
        ("pcontext", "python -m segm.scripts.prepare_pcontext $DATASET"),
        ("cityscapes", "python -m segm.scripts.prepare_cityscapes $DATASET"),
        ("synthetic", "python -m segm.scripts.prepare_synthetic $DATASET"),
    ]:
        with pytest.raises(FileNotFoundError) as e:
            build_dataset(name, "train", **kw)
        assert cmd in str(e.value) and str(tmp_path) in str(e.value)
    (tmp_path / "ade20k").mkdir()  # the folder exists but holds no ADEChallengeData2016
    with pytest.raises(FileNotFoundError, match="prepare_ade20k"):
        build_dataset("ade20k", "val", **kw)
    monkeypatch.delenv("DATASET")
    with pytest.raises(RuntimeError, match="DATASET"):
        build_dataset("ade20k", "train", **kw)


def test_unset_dataset_root_is_a_usage_error(monkeypatch):
    """One function says `$DATASET` is unset (`segm.config.dataset_dir`), as a usage error that
    every command prints in one line; the readers of default folders call it."""
    from segm.config import DatasetRootError, dataset_dir
    from segm.data.base import default_root
    from segm.data.layout import dataset_root

    monkeypatch.delenv("DATASET", raising=False)
    for read in (dataset_dir, lambda: default_root("ade20k"), lambda: dataset_root("cityscapes")):
        with pytest.raises(DatasetRootError, match="export DATASET=/path/to/datasets or pass --data-root DIR"):
            read()
    assert issubclass(DatasetRootError, ValueError) and issubclass(DatasetRootError, RuntimeError)


def test_bad_arguments(tmp_path, synthetic_root):
    kw = dict(im_size=32, crop_size=32, normalization="vit")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet", "train", **kw)
    with pytest.raises(ValueError, match="unknown split"):
        build_dataset("synthetic", "training", data_root=synthetic_root, **kw)
    with pytest.raises(ValueError, match="data-root"):
        build_dataset("custom", "train", **kw)
    with pytest.raises(ValueError, match="data-root"):
        dataset_info("custom")
    with pytest.raises(FileNotFoundError, match="--classes"):
        dataset_info("custom", data_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="images/"):
        build_dataset("custom", "train", data_root=tmp_path, classes_file=synthetic_root / "classes.yml", **kw)


@pytest.mark.parametrize(
    "content, match",
    [
        ({"names": []}, "non-empty list"),
        ({"names": ["a", "b"], "palette": [[1, 2, 3]]}, "palette"),
        ({"names": ["a", "b"], "ignore_index": 1}, "collides"),
        ({"names": ["a"], "reduce_zero_label": True, "ignore_index": 7}, "reduce_zero_label"),
        (["a", "b"], "mapping"),
    ],
)
def test_bad_classes_file(tmp_path, content, match):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match=match) as e:
        dataset_info("custom", data_root=tmp_path, classes_file=path)
    assert str(path) in str(e.value)


@pytest.fixture
def custom_root(tmp_path):
    root = tmp_path / "mine"
    classes = write_custom(root, np.random.default_rng(5), modes=("RGB", "RGB"))
    return root, classes


def _build(root, classes, split):
    return build_dataset("custom", split, im_size=32, crop_size=32, normalization="vit",
                         data_root=root, classes_file=classes)


@pytest.mark.parametrize("split", ["train", "val"])
def test_corrupt_files_are_named(custom_root, split):
    root, classes = custom_root
    ds = _build(root, classes, split)
    bad_image = root / "images" / ("training" if split == "train" else "validation") / "im0.png"
    bad_image.write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"cannot decode image {bad_image}"):
        ds[0]
    ds[1]  # the other item still loads
    bad_image.unlink()
    with pytest.raises(DataError, match=f"cannot read image {bad_image}"):
        ds[0]
    bad_label = ds.label_path(1)
    with open(bad_label, "r+b") as f:
        f.write(b"garbage!" * 4)
    with pytest.raises(DataError, match=f"cannot decode label {bad_label}"):
        ds[1]


@pytest.mark.parametrize("split", ["train", "val"])
def test_label_values_out_of_range(custom_root, split):
    root, classes = custom_root
    ds = _build(root, classes, split)
    label = np.array(Image.open(ds.label_path(0)))
    label[3, 3] = 7
    Image.fromarray(label).save(ds.label_path(0))
    with pytest.raises(DataError, match=r"values \[7\] outside the 3 classes") as e:
        ds[0]
    assert ds.label_path(0) in str(e.value)


def test_rgb_and_mismatched_labels(custom_root):
    root, classes = custom_root
    ds = _build(root, classes, "val")
    save_image(Path(ds.label_path(0)), np.zeros((20, 24, 3), np.uint8))
    with pytest.raises(DataError, match="single-channel"):
        ds[0]
    save_image(Path(ds.label_path(1)), np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match="is 10x10 but its image") as e:
        ds[1]
    assert ds.image_path(1) in str(e.value) and "must have the same stored size" in str(e.value)
    train = _build(root, classes, "train")
    save_image(Path(train.label_path(1)), np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match="is 10x10 but its image") as e:
        train[1]
    assert train.image_path(1) in str(e.value) and "EXIF orientation is ignored" in str(e.value)


def test_exif_rotated_images_pair_with_their_labels(custom_root):
    """A JPEG tagged "rotate 90°" is read in its stored pixel order, the order its label has:
    a non-square one no longer fails with a size mismatch (a square one no longer trains on a
    rotated image), in training, evaluation and policynet alike."""
    from policynet.data import PolicyDataset

    root, classes = custom_root
    for sub in ("training", "validation"):
        png = root / "images" / sub / "im0.png"
        im = Image.open(png)
        exif = im.getexif()
        exif[0x0112] = 6
        im.save(png.with_suffix(".jpg"), exif=exif, quality=95)
        png.unlink()
    val = _build(root, classes, "val")
    assert val.image_path(0).endswith("im0.jpg")
    assert val[0]["im_metas"][0]["ori_shape"] == tuple(val[0]["segmentation"].shape) == (20, 24)
    assert _build(root, classes, "train")[0]["im"].shape == (3, 32, 32)
    policy = PolicyDataset("custom", "val", data_root=root, classes_file=classes, crop_size=32)
    assert policy[0][0].shape == (3, 32, 32)


def test_two_images_with_one_name_are_refused(custom_root):
    """`x.png` and `x.jpg` would share the label `x.png` and train twice."""
    from policynet.data import list_files

    root, classes = custom_root
    folder = root / "images" / "training"
    Image.open(folder / "im1.png").save(folder / "im1.jpg")
    for build in (lambda: _build(root, classes, "train"), lambda: list_files("custom", "train", root)):
        with pytest.raises(DataError) as e:
            build()
        message = str(e.value)
        assert f"{folder / 'im1.jpg'} and {folder / 'im1.png'}" in message and "keep one of them" in message
    assert len(_build(root, classes, "val")) == 2


def test_missing_label_and_empty_folder(custom_root):
    root, classes = custom_root
    (root / "annotations" / "training" / "im1.png").unlink()
    with pytest.raises(FileNotFoundError, match="im1.png has no label"):
        _build(root, classes, "train")
    for p in (root / "images" / "validation").iterdir():
        p.unlink()
    with pytest.raises(FileNotFoundError, match="validation"):
        _build(root, classes, "val")
