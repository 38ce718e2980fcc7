"""The GPU check's steps: each a command with a time limit, its output appended to a log file,
its outcome recorded whatever happens (a step that fails or runs out of time never stops the
check). Standard library only."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

GRACE_S = 15  # after the time limit: SIGINT (pytest still writes its JUnit file), then SIGKILL


@dataclass
class StepResult:
    name: str
    status: str  # ok | failed | timed out | skipped
    seconds: float = 0.0
    returncode: int | None = None
    note: str = ""

    def line(self) -> str:
        rc = f", exit {self.returncode}" if self.status == "failed" else ""
        return f"{self.status}{rc}" + (f": {self.note}" if self.note else "")

    def as_dict(self) -> dict:
        return asdict(self)


class Budget:
    """A wall-clock deadline shared by the steps: each step gets its own cap, less what the
    later steps need at least."""

    def __init__(self, total_s: float):
        self.deadline = time.monotonic() + total_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, cap_s: float, reserve_s: float = 0.0) -> float:
        return min(cap_s, self.left() - reserve_s)


def _stop(proc: subprocess.Popen) -> None:
    """Interrupts the step's whole process group (torchrun workers, compile workers), then kills it."""
    for sig, wait in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(name: str, cmd: list[str], *, timeout: float, log_path: Path, env: dict | None = None,
             cwd: Path | None = None, min_s: float = 1.0) -> StepResult:
    """Runs `cmd` with a time limit, appending its output to `log_path`; a limit below `min_s`
    skips the step."""
    if timeout < min_s:
        return StepResult(name, "skipped", note=f"not enough time left ({max(timeout, 0):.0f} s)")
    start = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"\n===== {name} (limit {timeout:.0f} s): {shlex.join(cmd)}\n")
        log.flush()
        offset = log.tell()
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=cwd, env=env, start_new_session=True)
        except OSError as e:
            return StepResult(name, "failed", note=f"could not start: {e}")
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.flush()
            note = f"stopped at its limit of {timeout:.0f} s; last output: {_last_line(log_path, offset)}"
            _stop(proc)
            log.write(f"\n===== {name}: stopped at its limit of {timeout:.0f} s\n")
            return StepResult(name, "timed out", time.monotonic() - start, proc.returncode, note)
    seconds = time.monotonic() - start
    if rc != 0:
        return StepResult(name, "failed", seconds, rc, _last_line(log_path, offset))
    return StepResult(name, "ok", seconds, rc)


def _last_line(log_path: Path, offset: int) -> str:
    """The step's last non-empty output line (what a failure usually says), shortened."""
    with open(log_path, errors="replace") as f:
        f.seek(offset)
        lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    return (lines[-1][:200] if lines else "(no output)").replace("|", "/")
