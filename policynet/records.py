"""What a policy run writes besides its weights: JSON files and the run log.

`log.txt` holds one JSON object per line (start/resume events, training loss, evaluation
metrics); TensorBoard events go to the same folder.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from segm.utils.atomic import atomic_write_text

from .metrics import SELECTORS


def json_safe(data):
    """NaN/inf (e.g. precision with no positive prediction) → null, so the output is valid JSON."""
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


class RunLog:
    """log.txt (JSON lines, appended and flushed) + TensorBoard. `purge_step`: on resume, the
    iteration from which TensorBoard drops the events a stopped run wrote after its last save."""

    def __init__(self, run_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.file = open(run_dir / "log.txt", "a")
        self.tb = SummaryWriter(str(run_dir), purge_step=purge_step)

    def line(self, record: dict) -> None:
        self.file.write(json.dumps(json_safe(record), sort_keys=True, allow_nan=False) + "\n")
        self.file.flush()

    def metrics(self, iteration: int, split: str, m: dict) -> None:
        self.line({"iteration": iteration, "split": split, **m})
        self.tb.add_scalar(f"Accuracy/{split}", m["accuracy"], iteration)
        self.tb.add_scalar(f"Precision/{split}", m["precision"], iteration)
        self.tb.add_scalar(f"Recall/{split}", m["recall"], iteration)
        for sel in SELECTORS:
            self.tb.add_scalar(f"TopS_{split}/{sel}", m[f"top_s_{sel}"], iteration)

    def close(self) -> None:
        self.file.close()
        self.tb.close()
