"""Segmentation training, the reference recipe (SPEC §5): `python -m segm.train`.

One GPU, ADE20K, ViT-S with CTS (30 % fewer tokens):

    python -m segm.train --log-dir runs/ade20k_segmenter_small_patch16_cts_612_103 \
        --dataset ade20k --backbone vit_small_patch16_384 --decoder mask_transformer \
        --policy-method policy_net --num-tokens-notshared 612 --num-tokens-shared 103 \
        --policynet-ckpt policynet/logdir/policynet_efficientnet_ade20k/model.pth

Several GPUs or nodes: the same arguments under `torchrun --nproc_per_node 8 -m segm.train`
or `srun python -m segm.train` (one task per GPU). `--batch-size` is the global batch.

Recipe: SGD (Nesterov, momentum 0.9), polynomial LR (power 0.9) stepped per iteration with
optional warm-up and a floor, cross-entropy (ignore 255) on full-resolution logits, drop path
0.1, single-scale sliding-window evaluation every `--eval-freq` epochs and at the end.

--log-dir receives `checkpoint.pth` (reference keys `model`, `optimizer`, `n_cls`,
`lr_scheduler`, `epoch`, `loss_scaler`; plus `variant`, `format`, `iteration` and
`train_state`: data position, meters and every rank's RNG state), `variant.yml`, `log.txt`
(one JSON line per epoch) and TensorBoard events. Checkpoints are written atomically at every
epoch end and every `--ckpt-every` iterations; running the same command again resumes from
the last one and ends with the weights an uninterrupted run would have produced.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import click
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from segm.config import dataset_dir, dump_yaml, load_config, load_yaml
from segm.engine import NonFiniteLossError, check_finite_parameters, segmentation_loss
from segm.utils.determinism import (
    ResumableSampler,
    SeededDataset,
    gather_rng_states,
    seed_everything,
    set_rng_state,
)
from segm.utils.checkpoint import CheckpointError, safe_torch_load
from segm.utils.distributed import (
    DistInfo,
    barrier,
    cleanup,
    dist_env_from_environ,
    init_distributed,
    silence_print,
)
from segm.utils.logger import append_log, restore_log

DATASETS = ("ade20k", "pascal_context", "cityscapes", "synthetic", "custom")
POLICY_METHODS = ("policy_net", "no_sharing", "random", "oracle")
# timm tags of the ImageNet weights the reference starts from (SPEC §2.3); `--pretrained auto`.
PRETRAINED_TAGS = {
    "vit_tiny_patch16_384": "vit_tiny_patch16_384.augreg_in21k_ft_in1k",
    "vit_small_patch16_384": "vit_small_patch16_384.augreg_in21k_ft_in1k",
    "vit_base_patch16_384": "vit_base_patch16_384.augreg_in21k_ft_in1k",
    "vit_large_patch16_384": "vit_large_patch16_384.augreg_in21k_ft_in1k",
    "vit_small_patch32_384": "vit_small_patch32_384.augreg_in21k_ft_in1k",
    "vit_base_patch32_384": "vit_base_patch32_384.augreg_in21k_ft_in1k",
    "vit_large_patch32_384": "vit_large_patch32_384.orig_in21k_ft_in1k",
    "deit_tiny_distilled_patch16_224": "deit_tiny_distilled_patch16_224.fb_in1k",
    "deit_small_distilled_patch16_224": "deit_small_distilled_patch16_224.fb_in1k",
    "deit_base_distilled_patch16_224": "deit_base_distilled_patch16_224.fb_in1k",
    "deit_base_distilled_patch16_384": "deit_base_distilled_patch16_384.fb_in1k",
}
RUN_FILES = ("checkpoint.pth", "variant.yml", "log.txt")
POLY_POWER = 0.9
MOMENTUM = 0.9
EVAL_WINDOW_BATCH = 4
# Settings that do not change the training trajectory; a resumed run may change them freely.
_FREE_KEYS = {
    "resume", "log_dir", "version", "inference_kwargs", "dataset_kwargs.batch_size",
    "dataset_kwargs.num_workers", "dataset_kwargs.data_root", "algorithm_kwargs.start_epoch",
    "algorithm_kwargs.eval_freq", "train_kwargs.ckpt_every", "train_kwargs.world_size",
    "train_kwargs.device",
}


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


# ============================================================================ options
def resolve_options(o: SimpleNamespace, world_size: int) -> SimpleNamespace:
    """Fills the dataset-dependent defaults from configs/config.yml and checks the options
    against each other (cheap checks only: nothing is loaded here)."""
    from segm.data import canonical_name

    cfg = load_config()
    o = copy.copy(o)
    o.dataset = canonical_name(o.dataset)
    preset = cfg["dataset"][o.dataset]
    if o.backbone not in cfg["model"]:
        raise ConfigError(f"unknown backbone {o.backbone!r}; choose one of: {', '.join(cfg['model'])}")
    if o.decoder not in cfg["decoder"]:
        raise ConfigError(f"unknown decoder {o.decoder!r}; choose one of: {', '.join(cfg['decoder'])}")
    def default(value, fallback):
        return fallback if value is None else value

    o.im_size = default(o.im_size, preset["im_size"])
    crop_given = o.crop_size is not None
    o.crop_size = default(o.crop_size, preset.get("crop_size", o.im_size))
    # The presets evaluate with windows of the crop; a changed crop keeps that rule.
    o.window_size = default(o.window_size, preset.get("window_size", o.im_size) if not crop_given else o.crop_size)
    o.window_stride = default(o.window_stride, min(preset.get("window_stride", o.im_size), o.window_size))
    o.batch_size = default(o.batch_size, preset["batch_size"])
    o.learning_rate = default(o.learning_rate, preset["learning_rate"])
    o.eval_freq = default(o.eval_freq, preset.get("eval_freq", 1))
    if o.iterations is not None and o.epochs is not None:
        raise ConfigError("give --epochs or --iterations, not both")
    if o.iterations is None:
        o.epochs = default(o.epochs, preset["epochs"])
    o.normalization = default(o.normalization, cfg["model"][o.backbone]["normalization"])
    for name in ("im_size", "crop_size", "window_size", "window_stride", "batch_size", "epochs", "iterations"):
        value = getattr(o, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if o.learning_rate <= 0:
        raise ConfigError(f"--learning-rate must be positive, got {o.learning_rate}")
    if o.eval_freq < 0 or o.ckpt_every < 0 or o.num_workers < 0 or o.warmup_iter < 0:
        raise ConfigError("--eval-freq, --ckpt-every, --num-workers and --warmup-iter must be >= 0")
    if o.batch_size % world_size:
        raise ConfigError(
            f"--batch-size {o.batch_size} is the global batch and must be divisible by the "
            f"{world_size} processes; use a multiple of {world_size}"
        )
    if o.window_stride > o.window_size:
        raise ConfigError(f"--window-stride {o.window_stride} exceeds --window-size {o.window_size}")
    from segm.model.spec import check_window

    check_window(o.policy_method, (o.crop_size, o.crop_size), (o.window_size, o.window_size))
    if o.dataset == "custom" and not o.data_root:
        raise ConfigError("--dataset custom needs --data-root DIR (and --classes FILE)")
    if o.overwrite and o.resume:
        raise ConfigError("--overwrite and --resume contradict each other; give one of them")
    if o.amp_dtype not in ("fp16", "bf16"):
        raise ConfigError(f"--amp-dtype must be fp16 or bf16, got {o.amp_dtype}")
    return o


def net_kwargs_for(o: SimpleNamespace, n_cls: int) -> dict:
    from segm.model import build_net_kwargs

    extra = {"layer_norm_eps": o.layer_norm_eps, "n_layers": o.encoder_layers}
    if o.policy_method == "random":
        extra["random_seed"] = o.seed
    if o.policy_method == "oracle":
        extra["oracle_dataset"] = o.dataset
    return build_net_kwargs(
        o.backbone, o.decoder, n_cls, o.crop_size, dropout=o.dropout, drop_path_rate=o.drop_path,
        decoder_layers=o.decoder_layers, policy_method=o.policy_method,
        num_shared=o.num_tokens_shared, num_notshared=o.num_tokens_notshared,
        token_reduction=o.token_reduction, policynet_ckpt=o.policynet_ckpt, policy_backbone=o.policy_backbone,
        policy_ckpt_required=True, **extra,
    )


def build_variant(o, net_kwargs, world_size, iter_max, num_epochs, start_epoch) -> dict:
    """The reference `variant.yml` (SPEC §5.4) plus this project's `train_kwargs`."""
    return {
        "world_batch_size": o.batch_size,
        "version": "normal",
        "resume": bool(o.resume is not False),
        "amp": bool(o.amp),
        "log_dir": str(o.log_dir),
        "dataset_kwargs": {
            "dataset": o.dataset, "image_size": o.im_size, "crop_size": o.crop_size,
            "batch_size": o.batch_size // world_size, "normalization": o.normalization,
            "split": "train", "num_workers": o.num_workers,
            "data_root": str(o.data_root) if o.data_root else None,
            "classes_file": str(o.classes) if o.classes else None,
        },
        "algorithm_kwargs": {
            "batch_size": o.batch_size, "start_epoch": start_epoch, "num_epochs": num_epochs,
            "eval_freq": o.eval_freq,
        },
        "optimizer_kwargs": {
            "opt": o.optimizer, "lr": o.learning_rate, "weight_decay": o.weight_decay,
            "momentum": MOMENTUM, "clip_grad": None, "sched": o.scheduler, "epochs": num_epochs,
            "min_lr": o.min_lr, "poly_power": POLY_POWER, "poly_step_size": 1,
            "iter_warmup": o.warmup_iter, "iter_max": iter_max,
        },
        "net_kwargs": net_kwargs,
        "inference_kwargs": {"im_size": o.im_size, "window_size": o.window_size, "window_stride": o.window_stride},
        "train_kwargs": {
            "seed": o.seed, "iterations": o.iterations, "amp_dtype": o.amp_dtype if o.amp else None,
            "deterministic": bool(o.deterministic), "pretrained": o.pretrained, "ckpt_every": o.ckpt_every,
            "world_size": world_size, "device": o.device,
        },
    }


# ============================================================================ log folder
def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in _FREE_KEYS:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    keys = [k for k in dict.fromkeys([*a, *b]) if k not in _FREE_KEYS]
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys if a.get(k, "<unset>") != b.get(k, "<unset>")]


def plan_log_dir(log_dir: Path, variant: dict, resume: bool | None, overwrite: bool) -> tuple[Path | None, list[str]]:
    """Decides between a fresh start and resuming (rank 0 only; changes nothing on disk).

    Returns (checkpoint to resume or None, configuration differences to report).
    Raises ConfigError when the folder holds a run this command must not touch.
    """
    ckpt = log_dir / "checkpoint.pth"
    present = [f for f in RUN_FILES if (log_dir / f).exists()]
    if overwrite or not present:
        return None, []
    old_variant = log_dir / "variant.yml"
    if old_variant.is_file():
        try:
            diffs = config_differences(load_yaml(old_variant), variant)
        except ValueError:
            diffs = ["variant.yml: unreadable"]
    else:
        diffs = ["variant.yml: missing"]
    if resume is False:
        if ckpt.is_file():
            raise ConfigError(
                f"{log_dir} holds a run ({ckpt}); --no-resume would overwrite it. Pass --overwrite "
                "to discard it, or choose another --log-dir"
            )
        return None, []
    if diffs and resume is None:
        shown = "; ".join(diffs[:6]) + (f"; ... ({len(diffs)} differences)" if len(diffs) > 6 else "")
        raise ConfigError(
            f"{log_dir} holds a run with a different configuration ({shown}). Pass --resume to "
            "continue it with the new settings, --overwrite to start over, or choose another --log-dir"
        )
    return (ckpt if ckpt.is_file() else None), diffs


def clear_run(log_dir: Path) -> None:
    for name in RUN_FILES:
        (log_dir / name).unlink(missing_ok=True)
    for events in log_dir.glob("events.out.tfevents.*"):
        events.unlink()


def remove_torn_writes(log_dir: Path) -> None:
    """Temporary files of atomic writes interrupted by a crash."""
    for pattern in (".checkpoint.pth.*.tmp", ".log.txt.*.tmp", "variant.yml.tmp"):
        for path in log_dir.glob(pattern):
            path.unlink(missing_ok=True)


def broadcast_object(obj, info: DistInfo):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ============================================================================ set-up helpers
def init_device(o) -> DistInfo:
    if o.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu)")
    if o.device == "cpu" and torch.cuda.is_available():
        env = dist_env_from_environ()
        if env.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                    rank=env.rank, world_size=env.world_size)
        return DistInfo(env.rank, env.world_size, env.local_rank, torch.device("cpu"), env.world_size > 1)
    return init_distributed()


def load_pretrained(model, o) -> None:
    from segm.model.vit import load_pretrained_vit

    source = o.pretrained
    if source == "none":
        print("no pretrained weights: the encoder starts from a random initialisation")
        return
    if source == "auto":
        source = PRETRAINED_TAGS.get(o.backbone)
        if source is None:
            print(f"warning: no published ImageNet weights for {o.backbone}; the encoder starts from a random "
                  "initialisation (pass --pretrained FILE to start from weights)", force=True)
            return
    try:
        load_pretrained_vit(model.encoder, source)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"cannot load pretrained weights {source!r}: {e}") from None
    print(f"encoder initialised from {source}")


def restore_scheduler(scheduler, state: dict) -> list[str]:
    """Loads the schedule position; settings given on the command line win (explicit --resume
    with a new schedule). Returns the changed settings."""
    wanted = {k: getattr(scheduler, k) for k in ("lr0", "iter_max", "warmup_iter", "min_lr", "power")}
    scheduler.load_state_dict(state)
    changed = [f"{k}: {getattr(scheduler, k)} -> {v}" for k, v in wanted.items() if getattr(scheduler, k) != v]
    if changed:
        for k, v in wanted.items():
            setattr(scheduler, k, v)
        scheduler.step_update(scheduler.num_updates)
    return changed


def make_progress(total, initial, desc, enabled):
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if interactive else 30.0, leave=interactive)


# ============================================================================ training
def train(o: SimpleNamespace) -> dict:
    """Runs (or resumes) a training run; returns the last log record."""
    from segm.data import build_dataset, dataset_info, val_collate
    from segm.eval.evaluate import evaluate_dataset
    from segm.model import create_segmenter, save_model
    from segm.optim import PolynomialLR, create_optimizer

    with user_errors():
        env = dist_env_from_environ()
        o = resolve_options(o, env.world_size)
    if o.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    writer = None
    try:
        with user_errors():
            info = init_device(o)
        rank, world, device, main = info.rank, info.world_size, info.device, info.rank == 0
        silence_print(main)  # non-zero ranks print only with force=True
        if o.deterministic:
            # CUDA lacks deterministic kernels for a few ops (bilinear upsampling backward):
            # those warn; CPU runs are bit-exact.
            torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = not o.deterministic
            torch.backends.cudnn.deterministic = bool(o.deterministic)
            # TF32 matmuls, as the reference had them (PyTorch < 1.12 enabled them by default).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        log_dir = Path(o.log_dir)

        # ---- data
        with user_errors():
            if o.data_root is None:
                try:
                    dataset_dir()
                except RuntimeError as e:  # $DATASET unset
                    raise ConfigError(str(e)) from None
            ds_info = dataset_info(o.dataset, data_root=o.data_root, classes_file=o.classes)
            n_cls = ds_info.n_cls
            data_kw = dict(im_size=o.im_size, crop_size=o.crop_size, normalization=o.normalization,
                           data_root=o.data_root, classes_file=o.classes)
            train_set = SeededDataset(build_dataset(o.dataset, "train", **data_kw), o.seed)
            val_set = build_dataset(o.dataset, "val", **data_kw)
            local_batch = o.batch_size // world
            sampler = ResumableSampler(len(train_set), num_replicas=world, rank=rank, seed=o.seed)
            iters_per_epoch = math.ceil(sampler.per_rank / local_batch)
            total_iters = o.iterations or o.epochs * iters_per_epoch
            num_epochs = math.ceil(total_iters / iters_per_epoch)
            loader_kw = dict(num_workers=o.num_workers, pin_memory=device.type == "cuda")
            train_loader = DataLoader(
                train_set, batch_size=local_batch, sampler=sampler, drop_last=False,
                persistent_workers=o.num_workers > 0,
                # A private generator: creating an iterator must not draw from the global RNG.
                generator=torch.Generator().manual_seed(o.seed), **loader_kw,
            )
            val_sampler = DistributedSampler(val_set, shuffle=False) if info.distributed else None
            val_loader = DataLoader(val_set, batch_size=1, sampler=val_sampler, collate_fn=val_collate, **loader_kw)

        # ---- model description; fresh start or resume (decided on rank 0, nothing written yet)
        with user_errors():
            net_kwargs = net_kwargs_for(o, n_cls)
        variant = build_variant(o, net_kwargs, world, total_iters, num_epochs, start_epoch=0)
        plan = None
        if main:
            try:
                plan = plan_log_dir(log_dir, variant, o.resume, o.overwrite)
            except Exception as e:  # every rank must learn of it, or the others would wait forever
                plan = e
        plan = broadcast_object(plan, info)
        if isinstance(plan, Exception):
            raise plan
        resume_from, diffs = plan

        # ---- model, optimiser, schedule
        with user_errors():
            seed_everything(o.seed)  # identical initial weights on every rank
            model = create_segmenter(net_kwargs)
            # The ImageNet head is kept (and saved) but unused, as in the reference; freezing it lets
            # DDP run without find_unused_parameters. The policy net is frozen by the Segmenter.
            for head in ("head", "head_dist"):
                if isinstance(getattr(model.encoder, head, None), torch.nn.Module):
                    getattr(model.encoder, head).requires_grad_(False)
            if resume_from is None:
                load_pretrained(model, o)
            model.to(device)
            optimizer = create_optimizer(model, o.optimizer, lr=o.learning_rate, weight_decay=o.weight_decay,
                                         momentum=MOMENTUM)
            scheduler = PolynomialLR(optimizer, o.learning_rate, total_iters, o.warmup_iter, o.min_lr, POLY_POWER)
            amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[o.amp_dtype] if o.amp else None
            scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

        # ---- the log folder (touched only now that everything could be built)
        if main:
            log_dir.mkdir(parents=True, exist_ok=True)
            remove_torn_writes(log_dir)
            if resume_from is None:
                clear_run(log_dir)
            elif diffs:
                print("resuming with changed settings: " + "; ".join(diffs), force=True)
        barrier()

        # ---- resume
        num_updates, next_epoch, next_batch = 0, 0, 0
        meters = {"loss_sum": 0.0, "lr_sum": 0.0, "count": 0}
        last_record = None
        seed_everything(o.seed + rank)  # dropout / drop path differ between ranks
        if resume_from is not None:
            with user_errors():
                ckpt = safe_torch_load(resume_from, map_location="cpu")
            try:
                model.load_state_dict(ckpt["model"], strict=True)
                optimizer.load_state_dict(ckpt["optimizer"])
            except (KeyError, RuntimeError, ValueError) as e:
                raise ConfigError(
                    f"cannot resume from {resume_from}: {str(e).splitlines()[0]}. Pass --overwrite to start over"
                ) from None
            changed = restore_scheduler(scheduler, ckpt["lr_scheduler"])
            if changed and main:
                print("learning-rate schedule changed: " + "; ".join(changed), force=True)
            if scaler is not None and "loss_scaler" in ckpt:
                scaler.load_state_dict(ckpt["loss_scaler"])
            state = ckpt.get("train_state")
            if state:  # this project's checkpoint
                num_updates = int(ckpt["iteration"])
                next_epoch, next_batch = int(state["next_epoch"]), int(state["next_batch"])
                meters = dict(state["meters"])
                last_record = state.get("log_record")
                rngs = state.get("rng") or []
                if len(rngs) == world:
                    set_rng_state(rngs[rank], device, model)
                elif main:
                    print(f"warning: the checkpoint holds RNG states for {len(rngs)} processes, this run has "
                          f"{world}; dropout and drop path continue from fresh seeds", force=True)
            else:  # a reference checkpoint: whole epochs only
                next_epoch = int(ckpt["epoch"]) + 1
                num_updates = scheduler.num_updates
            if next_batch >= iters_per_epoch:
                next_epoch, next_batch = next_epoch + 1, 0
            del ckpt
            if main:
                print(f"resumed from {resume_from}: epoch {next_epoch}, batch {next_batch}, iteration {num_updates}")
        variant["algorithm_kwargs"]["start_epoch"] = next_epoch
        if num_updates >= total_iters:
            if main:
                restore_log(log_dir / "log.txt", before_epoch=num_epochs, pending=last_record)
                print(f"training already complete ({num_updates} of {total_iters} iterations) in {log_dir}")
            return last_record or {}
        if main:
            dump_yaml(variant, log_dir / "variant.yml")
            restore_log(log_dir / "log.txt", before_epoch=next_epoch, pending=last_record)

        if info.distributed:
            model_ddp = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        else:
            model_ddp = model
        if main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(log_dir), purge_step=num_updates if resume_from else None)
            n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"{o.dataset}: {len(train_set)} train / {len(val_set)} val images, {n_cls} classes; "
                  f"{o.backbone} + {o.decoder}, {n_params / 1e6:.2f} M trainable parameters, "
                  f"policy {o.policy_method} (U, S) = {tuple(net_kwargs['policy_schedule'])}; "
                  f"{world} process(es) on {device.type}, batch {o.batch_size} ({local_batch} per process), "
                  f"{iters_per_epoch} iterations/epoch, {total_iters} iterations")

        ckpt_path = log_dir / "checkpoint.pth"
        last_saved = {"iteration": num_updates if resume_from else None}

        def save_checkpoint(epoch_next, batch_next, record):
            check_finite_parameters(model)  # never replace a good checkpoint with broken weights
            rngs = gather_rng_states(device, world, model)
            if main:
                extra = {
                    "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                    "epoch": epoch_next - 1, "iteration": num_updates,
                    "train_state": {
                        "next_epoch": epoch_next, "next_batch": batch_next, "meters": dict(meters),
                        "rng": rngs, "log_record": record, "world_size": world, "seed": o.seed,
                    },
                }
                if scaler is not None:
                    extra["loss_scaler"] = scaler.state_dict()
                save_model(model, variant, ckpt_path, **extra)
            last_saved["iteration"] = num_updates

        def autocast():
            if amp_dtype is None:
                return contextlib.nullcontext()
            return torch.autocast(device_type=device.type, dtype=amp_dtype)

        # ---- loop
        record = last_record
        for epoch in range(next_epoch, num_epochs):
            if num_updates >= total_iters:
                break
            start_batch = next_batch if epoch == next_epoch else 0
            if start_batch == 0:  # else: the meters of the interrupted epoch, from the checkpoint
                meters = {"loss_sum": 0.0, "lr_sum": 0.0, "count": 0}
            end_batch = min(iters_per_epoch, start_batch + total_iters - num_updates)
            sampler.set_epoch(epoch, start_batch * local_batch)
            model_ddp.train()
            bar = make_progress(end_batch, start_batch, f"epoch {epoch}/{num_epochs - 1}", main)
            t_last, smooth_loss, speed = time.perf_counter(), None, None
            for batch_idx, batch in enumerate(train_loader, start=start_batch):
                im = batch["im"].to(device, non_blocking=True)
                seg = batch["segmentation"].to(device, non_blocking=True)
                with autocast():
                    logits = model_ddp(im, seg) if o.policy_method == "oracle" else model_ddp(im)
                loss, loss_global = segmentation_loss(logits, seg, world)
                loss_value = loss_global.item()
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"the loss is {loss_value} at iteration {num_updates + 1} (epoch {epoch}); training "
                        f"stopped. The last good checkpoint is {ckpt_path} (iteration {last_saved['iteration']})"
                    )
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                num_updates += 1
                scheduler.step_update(num_updates)
                lr = optimizer.param_groups[0]["lr"]  # as the reference: the lr after step_update
                meters["loss_sum"] += loss_value
                meters["lr_sum"] += lr
                meters["count"] += 1

                now = time.perf_counter()
                rate = o.batch_size / max(now - t_last, 1e-9)
                t_last = now
                smooth_loss = loss_value if smooth_loss is None else 0.9 * smooth_loss + 0.1 * loss_value
                speed = rate if speed is None else 0.9 * speed + 0.1 * rate
                bar.set_postfix(loss=f"{smooth_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}", refresh=False)
                bar.update(1)
                if writer is not None:
                    writer.add_scalar("train/loss", loss_value, num_updates)
                    writer.add_scalar("train/learning_rate", lr, num_updates)

                if batch_idx + 1 == end_batch:
                    break
                if o.ckpt_every and num_updates % o.ckpt_every == 0:
                    save_checkpoint(epoch, batch_idx + 1, record)
            bar.close()

            # ---- end of epoch (or of the run): evaluate, checkpoint, log
            full_epoch = end_batch == iters_per_epoch
            last = num_updates >= total_iters
            record = {"train_loss": meters["loss_sum"] / meters["count"],
                      "train_learning_rate": meters["lr_sum"] / meters["count"]}
            if last or (o.eval_freq and epoch % o.eval_freq == 0):
                scores = evaluate_dataset(
                    model_ddp, val_loader, n_cls=n_cls, window_size=o.window_size, window_stride=o.window_stride,
                    window_batch_size=EVAL_WINDOW_BATCH, device=device, amp_dtype=amp_dtype, progress=main,
                )
                for key in ("pixel_accuracy", "mean_accuracy", "mean_iou"):
                    record[f"val_{key}"] = scores[key]
            record["epoch"] = epoch
            record["num_updates"] = num_updates
            if full_epoch:
                save_checkpoint(epoch + 1, 0, record)
            else:
                save_checkpoint(epoch, end_batch, record)
            if main:
                append_log(log_dir / "log.txt", record)
                for key, value in record.items():
                    if key.startswith("val_"):
                        writer.add_scalar(f"val/{key[4:]}", value, num_updates)
                writer.flush()
                print(f"epoch {epoch}: " + ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "epoch"
                ))
        if main:
            print(f"training done: {num_updates} iterations; checkpoint {ckpt_path}")
        return record
    finally:
        if writer is not None:
            writer.close()
        torch.use_deterministic_algorithms(deterministic_before)
        cleanup()


# ============================================================================ CLI
_PRESET = " [default: the dataset preset in configs/config.yml]"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--log-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoint.pth, variant.yml, log.txt, TensorBoard events.")
@click.option("--dataset", required=True, type=click.Choice(DATASETS + ("pcontext",)), help="Training dataset.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The dataset's own folder [default: $DATASET/<dataset>]; required for custom.")
@click.option("--classes", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Classes file (YAML) of a custom dataset [default: <data-root>/classes.yml].")
@click.option("--im-size", type=int, default=None, help="Resize base (short side)." + _PRESET)
@click.option("--crop-size", type=int, default=None, help="Training crop = the encoder's token grid." + _PRESET)
@click.option("--window-size", type=int, default=None, help="Evaluation window [default: the crop].")
@click.option("--window-stride", type=int, default=None, help="Evaluation stride." + _PRESET)
@click.option("--backbone", required=True, help="A `model:` preset of configs/config.yml, e.g. vit_small_patch16_384.")
@click.option("--decoder", default="mask_transformer", help="linear | mask_transformer.")
@click.option("--encoder-layers", type=int, default=None,
              help="Override the backbone depth (for smoke tests and ablations).")
@click.option("--decoder-layers", type=int, default=2, help="Mask-transformer layers.")
@click.option("--pretrained", default="auto",
              help="Encoder weights: a .npz/.pth/.safetensors file, a timm name, 'auto' (the backbone's "
                   "ImageNet-21k weights via timm, as the reference) or 'none'. Ignored when resuming.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", help="sgd = SGD, Nesterov, momentum 0.9.")
@click.option("--scheduler", type=click.Choice(["polynomial"]), default="polynomial",
              help="Per-iteration polynomial decay, power 0.9.")
@click.option("--weight-decay", type=float, default=0.0)
@click.option("--dropout", type=float, default=0.0, help="Encoder dropout.")
@click.option("--drop-path", type=float, default=0.1, help="Encoder stochastic-depth rate.")
@click.option("--batch-size", type=int, default=None, help="Global batch, split over the processes." + _PRESET)
@click.option("--epochs", type=int, default=None, help="Training epochs." + _PRESET)
@click.option("--iterations", type=int, default=None, help="Train for N iterations instead of --epochs.")
@click.option("-lr", "--learning-rate", type=float, default=None, help="Base learning rate." + _PRESET)
@click.option("--warmup-iter", type=int, default=0, help="Linear warm-up iterations.")
@click.option("--min-lr", type=float, default=1e-5, help="Learning-rate floor of the schedule.")
@click.option("--normalization", type=click.Choice(["vit", "deit"]), default=None,
              help="Input normalisation [default: the backbone preset's].")
@click.option("--eval-freq", type=int, default=None,
              help="Evaluate when epoch % N == 0 and at the end (0: only at the end)." + _PRESET)
@click.option("--amp/--no-amp", default=False, help="Mixed precision (autocast).")
@click.option("--amp-dtype", type=click.Choice(["fp16", "bf16"]), default="fp16",
              help="Autocast dtype; fp16 uses a gradient scaler.")
@click.option("--resume/--no-resume", default=None,
              help="Resume from --log-dir/checkpoint.pth [default: resume when the folder holds the same "
                   "run]. An explicit --resume continues a run whose settings changed.")
@click.option("--overwrite", is_flag=True, help="Discard the run in --log-dir and start over.")
@click.option("--policy-method", type=click.Choice(POLICY_METHODS), default="policy_net",
              help="Which superpatches share a token (CTS); no_sharing = plain Segmenter.")
@click.option("--num-tokens-notshared", type=int, default=None, help="U (checked: U = N - 4S).")
@click.option("--num-tokens-shared", type=int, default=None, help="S, shared superpatches per image.")
@click.option("--token-reduction", type=float, default=None, help="Reduction rho instead of S: S = round(rho*N/3).")
@click.option("--policynet-ckpt", type=str, default=None, help="Policy-network model.pth (policy_net).")
@click.option("--policy-backbone", type=str, default=None,
              help="The policy network's timm backbone [default: as recorded in the config.json beside "
                   "--policynet-ckpt, else efficientnet_lite0].")
@click.option("--layer-norm-eps", type=float, default=None, help="LayerNorm eps [default: 1e-5, as the reference].")
@click.option("--seed", type=int, default=0, help="Seeds weights, data order and augmentation.")
@click.option("--num-workers", type=int, default=10, help="Data-loading processes per training process.")
@click.option("--ckpt-every", type=int, default=1000,
              help="Also checkpoint every N iterations (0: at epoch ends only).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              help="auto: cuda:LOCAL_RANK when CUDA is available, else the CPU.")
@click.option("--deterministic", is_flag=True,
              help="Deterministic algorithms (bit-exact on CPU; a few CUDA kernels have no deterministic version).")
def main(**kwargs):
    """Train Segmenter (+ CTS) with the reference recipe. Re-running the same command resumes."""
    from segm.data import DataError

    try:
        train(SimpleNamespace(**kwargs))
    except NonFiniteLossError as e:
        err = click.ClickException(str(e))
        err.exit_code = 3
        raise err from None
    except (ConfigError, DataError) as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
