"""The run folder (--log-dir): a fresh start, resuming, or overwriting; decided on rank 0
before anything is written, then acted on once everything could be built."""
from __future__ import annotations

from pathlib import Path

from segm.config import load_yaml
from segm.train.options import ConfigError, user_errors
from segm.train.process import broadcast_object
from segm.train.variant import config_differences
from segm.utils.distributed import DistInfo
from segm.utils.writable import check_writable

CHECKPOINT = "checkpoint.pth"
RUN_FILES = (CHECKPOINT, "variant.yml", "log.txt")


def plan_log_dir(log_dir: Path, variant: dict, resume: bool | None, overwrite: bool) -> tuple[Path | None, list[str]]:
    """Decides between a fresh start and resuming (changes nothing on disk).

    Returns (checkpoint to resume or None, configuration differences to report).
    Raises ConfigError when the folder holds a run this command must not touch, or cannot be
    written (a read-only folder, a file on its path).
    """
    with user_errors():
        check_writable(log_dir, "--log-dir")
    ckpt = log_dir / CHECKPOINT
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


def agree_on_plan(log_dir: Path, variant: dict, resume: bool | None, overwrite: bool,
                  info: DistInfo) -> tuple[Path | None, list[str]]:
    """`plan_log_dir` on rank 0, its answer (or its error) on every rank."""
    plan = None
    if info.rank == 0:
        try:
            plan = plan_log_dir(log_dir, variant, resume, overwrite)
        except Exception as e:  # every rank must learn of it, or the others would wait forever
            plan = e
    plan = broadcast_object(plan, info)
    if isinstance(plan, Exception):
        raise plan
    return plan


def open_log_dir(log_dir: Path, resume_from: Path | None, diffs: list[str]) -> None:
    """Creates the folder, removes torn writes and, on a fresh start, the previous run (rank 0)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    remove_torn_writes(log_dir)
    if resume_from is None:
        clear_run(log_dir)
    elif diffs:
        print("resuming with changed settings: " + "; ".join(diffs), force=True)


def clear_run(log_dir: Path) -> None:
    for name in RUN_FILES:
        (log_dir / name).unlink(missing_ok=True)
    for events in log_dir.glob("events.out.tfevents.*"):
        events.unlink()


def remove_torn_writes(log_dir: Path, names=RUN_FILES) -> None:
    """Temporary files of atomic writes (`.NAME.<random>.tmp`) of the run files `names`,
    interrupted by a crash."""
    for name in names:
        for path in log_dir.glob(f".{name}.*.tmp"):
            path.unlink(missing_ok=True)
