"""The policy trainer's own options (`python -m policynet.train -h` lists them)."""
from __future__ import annotations

import dataclasses

from segm.model.spec import DEFAULT_POLICY_BACKBONE

from .optim import check_optimizer

DEFAULT_LOGDIR = "runs/policynet"
REFERENCE_WORKERS = 8  # the reference's data-loading processes


@dataclasses.dataclass
class TrainConfig:
    dataset: str
    exp_name: str = "experiment"
    logdir: str = DEFAULT_LOGDIR
    num_iterations: int = 50000
    batch_size_train: int = 8
    batch_size_test: int = 10
    lr: float = 5e-5
    weight_decay: float = 1e-3
    momentum: float = 0.9
    optimizer: str = "AdamW"
    hflip: bool = True
    backbone: str = DEFAULT_POLICY_BACKBONE
    pretrained: str | None = "lite0"
    resume: bool = False
    seed: int = 0
    num_workers: int | None = None  # None: planned with `threads` (segm.utils.threads.plan_cpu)
    threads: int | None = None
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
        check_optimizer(self.optimizer)
        for key in ("num_iterations", "batch_size_train", "batch_size_test", "eval_iterations",
                    "log_iterations", "summary_iterations"):
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key} must be positive, got {getattr(self, key)}")
        if self.eval_train_batches < 0 or (self.num_workers or 0) < 0:
            raise ValueError("--eval_train_batches and --num-workers must be ≥ 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be ≥ 1, got {self.threads}")
        if not self.exp_name or "/" in self.exp_name or self.exp_name in (".", ".."):
            raise ValueError(f"--exp_name must be a plain folder name, got {self.exp_name!r}")
