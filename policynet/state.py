"""A policy training run's state, saved and restored as a whole.

`state.pth` (written atomically, loadable with `weights_only=True`) holds `model` (the
weights, as in `model.pth`), `optimizer`, `iteration`, `rng` (python, numpy, torch and CUDA
generators), `data` (seed, batch size, size of the train split, position = iteration) and
`config` (the settings a resumed run must share, `RESUME_KEYS`). The data order depends only on
those settings and the iteration (`policynet.data.TrainBatchSampler`), so a resumed run ends
with the weights of an uninterrupted one. See docs/DESIGN.md, "Checkpoints and variant.yml"
and "Determinism and resuming".
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from segm.train.context import RunContext
from segm.train.state import CheckpointedState
from segm.utils.checkpoint import atomic_torch_save, safe_torch_load

MODEL_FILE = "model.pth"
STATE_FILE = "state.pth"
RUN_FILES = (MODEL_FILE, STATE_FILE, "config.json", "log.txt")
# Settings that must not change when a run is resumed (the data order and the update depend on them).
RESUME_KEYS = ("dataset", "backbone", "batch_size_train", "optimizer", "lr", "weight_decay", "momentum",
               "hflip", "seed", "crop_size")
_STATE_KEYS = {"model", "optimizer", "iteration", "rng", "config", "data"}


def resume_settings(cfg, dataset: str, crop: int) -> dict:
    """The `RESUME_KEYS` of a TrainConfig, with the dataset and crop as resolved values."""
    return {**{k: getattr(cfg, k) for k in RESUME_KEYS}, "dataset": dataset, "crop_size": crop}


@dataclasses.dataclass
class TrainState(CheckpointedState):
    """The policy, its optimizer and the run's progress (segm.train's `CheckpointedState`),
    with the settings a resumed run must share, the size of the train split and the last
    evaluation's `metrics`."""

    settings: dict
    dataset_len: int
    metrics: dict = dataclasses.field(default_factory=dict)

    def save(self, run: RunContext) -> None:
        """`model.pth` (the plain state dict the segmenter loads), then `state.pth`."""
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

        def write(rngs: list[dict]) -> None:
            atomic_torch_save(weights, run.log_dir / MODEL_FILE)
            atomic_torch_save({
                "model": weights,
                "optimizer": self.optimizer.state_dict(),
                "iteration": self.iteration,
                "rng": rngs[0],
                "data": {"seed": self.settings["seed"], "batch_size": self.settings["batch_size_train"],
                         "dataset_len": self.dataset_len, "position": self.iteration},
                "config": self.settings,
            }, run.log_dir / STATE_FILE)

        self.write_checkpoint(run, write)

    def restore(self, checkpoint: dict, run: RunContext) -> None:
        """Continues from a `load_checkpoint` result: weights, optimizer, RNGs and iteration."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.restore_rng(run, [checkpoint["rng"]])
        self.iteration = self.last_saved = int(checkpoint["iteration"])


def load_checkpoint(path: Path, settings: dict, dataset_len: int, num_iterations: int) -> dict:
    """A `state.pth` that a run with these settings can continue up to `num_iterations`."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no training state at {path}; start without --resume")
    state = safe_torch_load(path)
    missing = _STATE_KEYS - set(state)
    if missing:
        raise ValueError(f"{path} is not a policynet training state (missing {sorted(missing)})")
    saved = state["config"]
    diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in settings.items() if saved.get(k) != v]
    if diff:
        raise ValueError(f"cannot resume {path} with different settings ({'; '.join(diff)})")
    if state["data"]["dataset_len"] != dataset_len:
        raise ValueError(f"cannot resume {path}: the train split had {state['data']['dataset_len']} images, "
                         f"now {dataset_len}")
    if state["iteration"] >= num_iterations:
        raise ValueError(
            f"{path} is already at iteration {state['iteration']} ≥ --num_iterations {num_iterations}; "
            "raise --num_iterations to continue"
        )
    return state
