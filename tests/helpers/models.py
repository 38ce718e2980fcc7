"""Tiny Segmenter runs on the synthetic dataset: a checkpoint.pth + variant.yml pair as training
writes them (evaluation and inference tests)."""
from __future__ import annotations

import torch

import segm
from segm.model import save_model
from segm.model.factory import write_variant

K = 10  # synthetic classes
CROP = 64


def tiny_net_kwargs(policy_method="random", n_cls=K):
    return {
        "image_size": (CROP, CROP), "patch_size": 16, "d_model": 64, "n_heads": 2, "n_layers": 2,
        "n_cls": n_cls, "normalization": "vit", "dropout": 0.0, "drop_path_rate": 0.0,
        "decoder": {"name": "linear", "n_cls": n_cls},
        "policy_method": policy_method, "policy_schedule": (8, 2) if policy_method != "no_sharing" else (16, 0),
    }


def tiny_variant(data_root, policy_method="random"):
    return {
        "net_kwargs": tiny_net_kwargs(policy_method),
        "dataset_kwargs": {
            "dataset": "synthetic", "image_size": 128, "crop_size": CROP, "batch_size": 2,
            "normalization": "vit", "split": "train", "num_workers": 0,
            "data_root": str(data_root), "classes_file": None,
        },
        "inference_kwargs": {"im_size": 128, "window_size": CROP, "window_stride": 32},
    }


def make_model_dir(tmp_path, data_root, policy_method="random", seed=0):
    """A checkpoint.pth + variant.yml pair, as training writes them; returns (ckpt, model, variant)."""
    variant = tiny_variant(data_root, policy_method)
    torch.manual_seed(seed)
    model = segm.create_segmenter(variant["net_kwargs"])
    d = tmp_path / "run"
    d.mkdir(parents=True)
    save_model(model, variant, d / "checkpoint.pth")
    write_variant(variant, d)
    return d / "checkpoint.pth", model.eval(), variant
