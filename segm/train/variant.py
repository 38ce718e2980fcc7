"""`variant.yml`: a run's settings as the reference records them (docs/DESIGN.md,
"Checkpoints and variant.yml"), and which of them a resumed run may change freely."""
from __future__ import annotations

from segm.train.model import MOMENTUM, POLY_POWER
from segm.train.options import TrainOptions

# Settings that do not change the training trajectory; a resumed run may change them freely.
FREE_KEYS = {
    "resume", "log_dir", "version", "inference_kwargs", "dataset_kwargs.batch_size",
    "dataset_kwargs.num_workers", "dataset_kwargs.data_root", "algorithm_kwargs.start_epoch",
    "algorithm_kwargs.eval_freq", "train_kwargs.ckpt_every", "train_kwargs.world_size",
    "train_kwargs.device",
}


def build_variant(opts: TrainOptions, net_kwargs: dict, world_size: int, iter_max: int, num_epochs: int) -> dict:
    """The reference `variant.yml` plus this project's `train_kwargs`; `start_epoch` is 0
    until the run knows where it starts."""
    return {
        "world_batch_size": opts.batch_size,
        "version": "normal",
        "resume": bool(opts.resume is not False),
        "amp": bool(opts.amp),
        "log_dir": str(opts.log_dir),
        "dataset_kwargs": {
            "dataset": opts.dataset, "image_size": opts.im_size, "crop_size": opts.crop_size,
            "batch_size": opts.batch_size // world_size, "normalization": opts.normalization,
            "split": "train", "num_workers": opts.num_workers,
            "data_root": str(opts.data_root) if opts.data_root else None,
            "classes_file": str(opts.classes) if opts.classes else None,
        },
        "algorithm_kwargs": {
            "batch_size": opts.batch_size, "start_epoch": 0, "num_epochs": num_epochs, "eval_freq": opts.eval_freq,
        },
        "optimizer_kwargs": {
            "opt": opts.optimizer, "lr": opts.learning_rate, "weight_decay": opts.weight_decay,
            "momentum": MOMENTUM, "clip_grad": None, "sched": opts.scheduler, "epochs": num_epochs,
            "min_lr": opts.min_lr, "poly_power": POLY_POWER, "poly_step_size": 1,
            "iter_warmup": opts.warmup_iter, "iter_max": iter_max,
        },
        "net_kwargs": net_kwargs,
        "inference_kwargs": {
            "im_size": opts.im_size, "window_size": opts.window_size, "window_stride": opts.window_stride,
        },
        "train_kwargs": {
            "seed": opts.seed, "iterations": opts.iterations, "amp_dtype": opts.amp_dtype if opts.amp else None,
            "deterministic": bool(opts.deterministic), "pretrained": opts.pretrained, "ckpt_every": opts.ckpt_every,
            "world_size": world_size, "device": opts.device,
        },
    }


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in FREE_KEYS:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every setting that differs, the free ones aside."""
    a, b = _flatten(old), _flatten(new)
    keys = [k for k in dict.fromkeys([*a, *b]) if k not in FREE_KEYS]
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys
            if a.get(k, "<unset>") != b.get(k, "<unset>")]
