"""Training state, saved and restored as a whole. `CheckpointedState` is what every trainer's
state shares (the model, its optimiser, the update count, the checkpoint on disk) and the one
way a checkpoint is written and the RNGs restored; `TrainState` is segm.train's: everything a
checkpoint holds and a resumed run continues from (docs/DESIGN.md, "Checkpoints and
variant.yml" and "Determinism and resuming")."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING

import torch

from segm.train.context import Run, RunContext
from segm.train.loss import NonFiniteLossError, check_finite_parameters
from segm.train.options import ConfigError, user_errors
from segm.train.process import broadcast_object
from segm.utils.checkpoint import CheckpointError, safe_torch_load, state_dict_mismatch
from segm.utils.determinism import gather_rng_states, set_rng_state

if TYPE_CHECKING:
    from segm.model import Segmenter
    from segm.optim import PolynomialLR


def fresh_meters() -> dict:
    """The sums behind an epoch's log line."""
    return {"loss_sum": 0.0, "lr_sum": 0.0, "count": 0}


@dataclass
class CheckpointedState:
    """The model (unwrapped) and its optimiser, the number of updates, and the iteration of the
    last checkpoint on disk (None: none yet)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    _: KW_ONLY
    iteration: int = 0
    last_saved: int | None = None

    def write_checkpoint(self, run: RunContext, write: Callable[[list[dict]], None]) -> None:
        """Checkpoints the run through `write(rngs)`, called on rank 0 with every rank's RNG
        state (a collective). TensorBoard is flushed first, so every scalar up to this step is
        on disk with the checkpoint; broken weights never replace a good checkpoint; a failed
        write (disk full) stops every rank, none waiting on the others."""
        if run.writer is not None:
            run.writer.flush()
        try:
            check_finite_parameters(self.model)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"{e} at iteration {self.iteration}; training stopped. "
                                     + self.last_checkpoint_note(run)) from None
        rngs = gather_rng_states(run.device, run.world_size, self.model)
        failure = None
        if run.is_main:
            try:
                write(rngs)
            except CheckpointError as e:  # the old file is untouched
                failure = f"{e}; training stopped at iteration {self.iteration}. {self.last_checkpoint_note(run)}"
        failure = broadcast_object(failure, run.dist)
        if failure is not None:
            raise CheckpointError(failure)
        self.last_saved = self.iteration

    def last_checkpoint_note(self, run: RunContext) -> str:
        if self.last_saved is None:
            return f"No checkpoint was written yet ({run.ckpt_path} does not exist)"
        return f"The last good checkpoint is {run.ckpt_path} (iteration {self.last_saved}), intact"

    def restore_rng(self, run: RunContext, rngs: list[dict]) -> None:
        """This rank's RNG state from a checkpoint's list (one per process of the saving run)."""
        if len(rngs) == run.world_size:
            set_rng_state(rngs[run.dist.rank], run.device, self.model)
        elif run.is_main:
            print(f"warning: the checkpoint holds RNG states for {len(rngs)} processes, this run has "
                  f"{run.world_size}; dropout and drop path continue from fresh seeds", force=True)


@dataclass
class TrainState(CheckpointedState):
    """segm.train's state: also the schedule and scaler; the data position to continue from
    (`next_epoch`, `next_batch`); the meters of the current epoch; the last epoch's log line.
    Every process's RNG state travels with it in the checkpoint."""

    model: Segmenter
    scheduler: PolynomialLR
    scaler: torch.amp.GradScaler | None
    next_epoch: int = 0
    next_batch: int = 0
    meters: dict = field(default_factory=fresh_meters)
    log_record: dict | None = None

    def checkpoint_entries(self, rngs: list[dict], world_size: int, seed: int) -> dict:
        """The checkpoint's entries besides those `save_model` writes (model, variant, format,
        n_cls): reference `optimizer`, `lr_scheduler`, `epoch` (last completed), `loss_scaler`,
        and this project's `iteration` and `train_state`."""
        entries = {
            "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.scheduler.state_dict(),
            "epoch": self.next_epoch - 1, "iteration": self.iteration,
            "train_state": {
                "next_epoch": self.next_epoch, "next_batch": self.next_batch, "meters": dict(self.meters),
                "rng": rngs, "log_record": self.log_record, "world_size": world_size, "seed": seed,
            },
        }
        if self.scaler is not None:
            entries["loss_scaler"] = self.scaler.state_dict()
        return entries

    def save(self, run: Run, next_epoch: int, next_batch: int) -> None:
        """Checkpoints the run to continue at (`next_epoch`, `next_batch`); a collective."""
        from segm.model import save_model

        self.next_epoch, self.next_batch = next_epoch, next_batch
        self.write_checkpoint(run, lambda rngs: save_model(
            self.model, run.variant, run.ckpt_path, **self.checkpoint_entries(rngs, run.world_size, run.opts.seed)))

    def restore(self, run: Run, path) -> None:
        """Continues from the checkpoint at `path`: this project's (exact position, meters, RNG
        states) or the reference's (whole epochs only)."""
        with user_errors():
            ckpt = safe_torch_load(path, map_location="cpu")
        try:
            problem = isinstance(ckpt["model"], dict) and state_dict_mismatch(self.model, ckpt["model"])
            if problem:
                raise ValueError(f"the model does not fit: {problem}")
            self.model.load_state_dict(ckpt["model"], strict=True)
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise ConfigError(
                f"cannot resume from {path}: {str(e).splitlines()[0]}. Pass --overwrite to start over"
            ) from None
        changed = restore_scheduler(self.scheduler, ckpt["lr_scheduler"])
        if changed and run.is_main:
            print("learning-rate schedule changed: " + "; ".join(changed), force=True)
        if self.scaler is not None and "loss_scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["loss_scaler"])
        saved = ckpt.get("train_state")
        if saved:
            self.iteration = int(ckpt["iteration"])
            self.next_epoch, self.next_batch = int(saved["next_epoch"]), int(saved["next_batch"])
            self.meters = dict(saved["meters"])
            self.log_record = saved.get("log_record")
            self.restore_rng(run, saved.get("rng") or [])
        else:
            self.next_epoch = int(ckpt["epoch"]) + 1
            self.iteration = self.scheduler.num_updates
        if self.next_batch >= run.data.iters_per_epoch:
            self.next_epoch, self.next_batch = self.next_epoch + 1, 0
        self.last_saved = self.iteration
        if run.is_main:
            print(f"resumed from {path}: epoch {self.next_epoch}, batch {self.next_batch}, iteration {self.iteration}")


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
