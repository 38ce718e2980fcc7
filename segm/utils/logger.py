"""`log.txt`: one JSON object per line and per epoch, kept consistent with the
checkpoint across crashes.

The training loop writes the checkpoint (which carries the epoch's record) first and appends
the line second. On resume, `restore_log` drops lines the checkpoint does not cover (and a
line torn by a crash) and re-appends the checkpoint's record if the crash came in between.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from segm.utils.atomic import atomic_write_text

__all__ = ["append_log", "read_log", "restore_log"]


def read_log(path) -> list[dict]:
    """The records of a log file; a torn (unparsable) line is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def append_log(path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_log(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def restore_log(path, *, before_epoch: int, pending: dict | None = None) -> None:
    """Keep the records of epochs < `before_epoch` (those the checkpoint covers), then add
    `pending` (the checkpoint's last record) if it is one of them and has no line."""
    path = Path(path)
    records = [r for r in read_log(path) if r.get("epoch", -1) < before_epoch]
    if (pending is not None and pending.get("epoch", before_epoch) < before_epoch
            and all(r.get("epoch") != pending.get("epoch") for r in records)):
        records.append(pending)
    if records or path.exists():
        _write_log(path, records)
