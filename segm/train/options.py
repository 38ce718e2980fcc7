"""The training options: the command line, resolved once against the presets of
configs/config.yml and checked against each other.

The model's own rules (backbone and decoder names, token budget, crop, policy checkpoint and
backbone) are not checked here but by `segm.model.spec.build_net_kwargs`, once the dataset's
number of classes is known (`segm.train.model.model_description`).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from segm.config import load_config
from segm.eval.window import check_stride
from segm.model.reduction.policy_rules import POLICY_NET
from segm.model.shared_schema import MAX_SIZE
from segm.model.reduction.rules import NO_SHARING, check_window, parse_reducer, policy_reduction
from segm.utils.amp import AMP_DTYPES
from segm.utils.checkpoint import CheckpointError



class ConfigError(ValueError):
    """Bad options, missing files, or a log folder that cannot be used as asked."""


@contextlib.contextmanager
def user_errors():
    """Set-up failures caused by the command line or the files it names become ConfigError
    (one line on the console); errors inside the training loop keep their traceback."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError, NotADirectoryError, NotImplementedError, CheckpointError) as e:
        raise ConfigError(str(e)) from None


@dataclass(frozen=True)
class TrainOptions:
    """Every option of `python -m segm.train`, under the same names, with the dataset presets
    filled in. Built by `resolve_options`."""

    log_dir: Path
    dataset: str
    data_root: Path | None
    classes: Path | None
    im_size: int
    crop_size: int
    window_size: int
    window_stride: int
    backbone: str
    decoder: str
    encoder_layers: int | None
    decoder_layers: int
    pretrained: str
    optimizer: str
    scheduler: str
    weight_decay: float
    dropout: float
    drop_path: float
    batch_size: int  # global, split over the processes
    epochs: int | None  # None when training for --iterations
    iterations: int | None
    learning_rate: float
    warmup_iter: int
    min_lr: float
    normalization: str | None  # None only for an unknown backbone, which build_net_kwargs reports
    eval_freq: int
    amp: bool
    amp_dtype: str
    resume: bool | None  # None: resume when the folder holds the same run
    overwrite: bool
    policy_method: str
    num_tokens_notshared: int | None
    num_tokens_shared: int | None
    token_reduction: float | None
    policynet_ckpt: str | None
    policy_backbone: str | None
    reducer: str | None  # NAME[:KEY=VALUE,...], parsed by the reduction rules
    layer_norm_eps: float | None
    seed: int
    num_workers: int  # resolved with threads by `segm.utils.threads.plan_cpu` when not given
    ckpt_every: int
    device: str
    deterministic: bool
    threads: int | None = None  # intra-op threads; None: torch's default
    final_eval: bool = True  # evaluate at the end even when --eval-freq does not ask for it

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype of the forward pass under autocast; None without --amp."""
        return AMP_DTYPES[self.amp_dtype] if self.amp else None


def resolve_options(given, world_size: int) -> TrainOptions:
    """The options of the command line (a mapping or a namespace of `main`'s parameters) with
    the dataset-dependent defaults filled in, checked for `world_size` processes. Cheap:
    nothing is loaded. Raises ConfigError."""
    from segm.data import canonical_name

    values = dict(given) if isinstance(given, Mapping) else dict(vars(given))
    values["dataset"] = canonical_name(values["dataset"])
    values["log_dir"] = Path(values["log_dir"])
    fill_presets(values, load_config())
    fill_cpu_plan(values)
    opts = TrainOptions(**values)
    check_options(opts, world_size)
    return opts


# The reference's data-loading processes per training process.
REFERENCE_WORKERS = 10


def fill_cpu_plan(values: dict) -> None:
    """Workers and intra-op threads left unset are planned together (`segm.utils.threads`)."""
    from segm.utils.device import DeviceError, resolve_device
    from segm.utils.threads import plan_cpu

    try:
        device_type = resolve_device(values["device"]).type
    except DeviceError:
        device_type = "cuda"  # refused with its own message when the process starts
    try:
        plan = plan_cpu(device_type, REFERENCE_WORKERS, values["num_workers"], values.get("threads"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    values["num_workers"], values["threads"] = plan.workers, plan.threads


def fill_presets(values: dict, cfg: dict) -> None:
    """Options left unset take the dataset preset's value (and the backbone preset's
    normalisation)."""
    preset = cfg["dataset"][values["dataset"]]

    def default(name, fallback):
        if values[name] is None:
            values[name] = fallback

    default("im_size", preset["im_size"])
    crop_given = values["crop_size"] is not None
    default("crop_size", preset.get("crop_size", values["im_size"]))
    # The presets evaluate with windows of the crop; a changed crop keeps that rule.
    default("window_size", values["crop_size"] if crop_given else preset.get("window_size", values["im_size"]))
    default("window_stride", min(preset.get("window_stride", values["im_size"]), values["window_size"]))
    default("batch_size", preset["batch_size"])
    default("learning_rate", preset["learning_rate"])
    default("eval_freq", preset.get("eval_freq", 1))
    if values["iterations"] is None:
        default("epochs", preset["epochs"])
    default("normalization", cfg["model"].get(values["backbone"], {}).get("normalization"))
    # the reference trains CTS with the policy network; a --reducer alone means no sharing under it
    default("policy_method", NO_SHARING if values.get("reducer") else POLICY_NET)


def check_options(opts: TrainOptions, world_size: int) -> None:
    """The rules about training options; the model's are `build_net_kwargs`'s."""
    if opts.iterations is not None and opts.epochs is not None:
        raise ConfigError("give --epochs or --iterations, not both")
    for name in ("im_size", "crop_size", "window_size", "window_stride", "batch_size", "epochs", "iterations"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("im_size", "crop_size", "window_size", "window_stride"):
        if getattr(opts, name) > MAX_SIZE:  # more is no image this project can hold in memory
            raise ConfigError(f"--{name.replace('_', '-')} must be at most {MAX_SIZE} pixels, got {getattr(opts, name)}")
    if not (math.isfinite(opts.learning_rate) and opts.learning_rate > 0):
        raise ConfigError(f"--learning-rate must be a positive finite number, got {opts.learning_rate}")
    if opts.eval_freq < 0 or opts.ckpt_every < 0 or opts.num_workers < 0 or opts.warmup_iter < 0:
        raise ConfigError("--eval-freq, --ckpt-every, --num-workers and --warmup-iter must be >= 0")
    if opts.batch_size % world_size:
        raise ConfigError(
            f"--batch-size {opts.batch_size} is the global batch and must be divisible by the "
            f"{world_size} processes; use a multiple of {world_size}"
        )
    check_stride(opts.window_size, opts.window_stride)
    with user_errors():
        method = parse_reducer(opts.reducer)["name"] if opts.reducer else policy_reduction(opts.policy_method, 0).method
        check_window(method, (opts.crop_size, opts.crop_size), (opts.window_size, opts.window_size))
    if opts.dataset == "custom" and not opts.data_root:
        raise ConfigError("--dataset custom needs --data-root DIR (and --classes FILE)")
    if opts.overwrite and opts.resume:
        raise ConfigError("--overwrite and --resume contradict each other; give one of them")
    if opts.amp_dtype not in AMP_DTYPES:
        raise ConfigError(f"--amp-dtype must be fp16 or bf16, got {opts.amp_dtype}")
