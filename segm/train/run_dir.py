"""The run folder (--log-dir): a fresh start, resuming, or overwriting; decided on rank 0
before anything is written, then acted on once everything could be built, under the folder's
lock (`segm.utils.lock`): one run at a time writes there."""
from __future__ import annotations

from pathlib import Path

from segm.config import load_yaml
from segm.train.options import ConfigError, user_errors
from segm.train.process import broadcast_object
from segm.train.variant import config_differences
from segm.utils.atomic import remove_stale_temps
from segm.utils.distributed import DistInfo
from segm.utils.lock import FolderLock, check_unlocked, lock_folder
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
            with user_errors():
                check_unlocked(log_dir, "--log-dir")  # refused now, not after the model is built
            plan = plan_log_dir(log_dir, variant, resume, overwrite)
        except Exception as e:  # every rank must learn of it, or the others would wait forever
            plan = e
    plan = broadcast_object(plan, info)
    if isinstance(plan, Exception):
        raise plan
    return plan


def lock_and_open(log_dir: Path, variant: dict, resume: bool | None, overwrite: bool,
                  plan: tuple[Path | None, list[str]], info: DistInfo) -> FolderLock | None:
    """Rank 0 takes the folder's lock, checks that `plan` still holds under it (another run may
    have written there since it was made), then opens the folder; every rank learns of a
    failure. Returns the lock on rank 0 (released by the caller), None elsewhere."""
    lock, error = None, None
    if info.rank == 0:
        try:
            lock = _lock_and_open(log_dir, variant, resume, overwrite, plan)
        except Exception as e:  # every rank must learn of it, or the others would wait forever
            error = e
    error = broadcast_object(error, info)
    if error is not None:
        raise error
    return lock


def _lock_and_open(log_dir, variant, resume, overwrite, plan) -> FolderLock:
    with user_errors():
        lock = lock_folder(log_dir, "--log-dir")
    try:
        if plan_log_dir(log_dir, variant, resume, overwrite)[0] != plan[0]:  # resuming, or from what
            raise ConfigError(f"{log_dir} changed while this run was starting (another run wrote to it): "
                              "run the command again")
        open_log_dir(log_dir, *plan)
    except BaseException:
        lock.release()
        raise
    return lock


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
    """Temporary files of atomic writes of the run files `names`, interrupted by a crash."""
    for name in names:
        remove_stale_temps(log_dir / name)
