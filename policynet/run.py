"""A policy training run, resolved once from its options: the dataset, device and folder (a
segm.train `RunContext`), the data and the top-S budget; the state it starts or continues
from; its loaders."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

from torch.utils.data import DataLoader

from segm.data.base import canonical_name
from segm.model.policy import build_policy
from segm.train.context import RunContext
from segm.train.process import single_process, use_cpu_plan
from segm.train.run_dir import remove_torn_writes
from segm.utils.device import resolve_device
from segm.utils.threads import plan_cpu
from segm.utils.determinism import seed_everything
from segm.utils.writable import check_writable

from .data import PolicyDataset, TrainBatchSampler, eval_subset
from .evaluation import build_eval_set, eval_loader
from .metrics import check_budget
from .optim import build_optimizer
from .options import REFERENCE_WORKERS, TrainConfig
from .records import write_json
from .state import MODEL_FILE, RUN_FILES, STATE_FILE, TrainState, load_checkpoint, resume_settings


@dataclasses.dataclass
class PolicyRun(RunContext):
    """One process; `ckpt_path` is the `state.pth` that --resume continues."""

    cfg: TrainConfig
    name: str
    train_set: PolicyDataset
    val_set: PolicyDataset
    train_eval_set: PolicyDataset
    num_shared: int

    @property
    def crop(self) -> int:
        return self.train_set.geometry.size

    @property
    def settings(self) -> dict:
        return resume_settings(self.cfg, self.name, self.crop)


class Loaders(NamedTuple):
    train: DataLoader  # the remaining batches, from the run's current iteration
    val: DataLoader
    train_eval: DataLoader  # a fixed subset of the train split, deterministic views


def resolve_run(cfg: TrainConfig) -> PolicyRun:
    cfg.check()
    name = canonical_name(cfg.dataset)
    device = resolve_device(cfg.device)
    plan = plan_cpu(device.type, REFERENCE_WORKERS, cfg.num_workers, cfg.threads)
    cfg.num_workers, cfg.threads = plan.workers, plan.threads
    use_cpu_plan(plan.threads, device.type)
    log_dir = Path(cfg.logdir) / cfg.exp_name
    check_writable(log_dir, "--logdir")
    data = dict(data_root=cfg.data_root, classes_file=cfg.classes, crop_size=cfg.crop_size)
    train_set = PolicyDataset(name, "train", train=True, hflip=cfg.hflip, **data)
    crop = train_set.geometry.size
    val_set = build_eval_set(name, "val", **data)
    train_eval_set = build_eval_set(name, "train", **data)
    s = check_budget(cfg.num_shared, crop, name)
    return PolicyRun(single_process(device), log_dir, log_dir / STATE_FILE, cfg, name, train_set, val_set,
                     train_eval_set, s)


def read_checkpoint(run: PolicyRun) -> dict | None:
    """The state to continue (`--resume`), or None for a new run; a run is never overwritten."""
    if run.cfg.resume:
        return load_checkpoint(run.ckpt_path, run.settings, len(run.train_set), run.cfg.num_iterations)
    if run.ckpt_path.exists() or (run.log_dir / MODEL_FILE).exists():
        raise FileExistsError(
            f"{run.log_dir} already holds a run; pass --resume to continue it or choose another --exp_name"
        )
    return None


def build_state(run: PolicyRun, checkpoint: dict | None) -> TrainState:
    cfg = run.cfg
    seed_everything(cfg.seed)
    model = build_policy(cfg.backbone, None if checkpoint else cfg.pretrained).to(run.device)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
    state = TrainState(model, optimizer, run.settings, len(run.train_set))
    if checkpoint is not None:
        state.restore(checkpoint, run)
    return state


def open_run_dir(run: PolicyRun) -> None:
    """Creates the folder, removes writes torn by a crash and records the run's settings."""
    run.log_dir.mkdir(parents=True, exist_ok=True)
    remove_torn_writes(run.log_dir, RUN_FILES)
    write_json(run.log_dir / "config.json", {**dataclasses.asdict(run.cfg), "crop": run.crop,
                                             "num_shared_eval": run.num_shared})


def build_loaders(run: PolicyRun, start: int) -> Loaders:
    cfg, pin = run.cfg, run.device.type == "cuda"
    sampler = TrainBatchSampler(len(run.train_set), cfg.batch_size_train, cfg.seed, start, cfg.num_iterations)
    train = DataLoader(run.train_set, batch_sampler=sampler, num_workers=cfg.num_workers, pin_memory=pin,
                       persistent_workers=False)
    subset = eval_subset(len(run.train_eval_set), cfg.eval_train_batches * cfg.batch_size_test)
    return Loaders(
        train,
        eval_loader(run.val_set, cfg.batch_size_test, cfg.num_workers, run.device),
        eval_loader(run.train_eval_set, cfg.batch_size_test, cfg.num_workers, run.device, indices=subset),
    )
