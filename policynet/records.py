"""What a policy run writes besides its weights: JSON files, and its lines and scalars in
the run log of segm.train (`RunContext.log_line`, `RunContext.writer`).

`log.txt` holds one JSON object per line (start/resume events, training loss, evaluation
metrics), keys sorted and NaN written as null; TensorBoard events go to the same folder.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from segm.train.context import RunContext
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


def log_line(run: RunContext, record: dict) -> None:
    run.log_line(dict(sorted(json_safe(record).items())))


def log_metrics(run: RunContext, iteration: int, split: str, m: dict) -> None:
    log_line(run, {"iteration": iteration, "split": split, **m})
    run.writer.add_scalar(f"Accuracy/{split}", m["accuracy"], iteration)
    run.writer.add_scalar(f"Precision/{split}", m["precision"], iteration)
    run.writer.add_scalar(f"Recall/{split}", m["recall"], iteration)
    for sel in SELECTORS:
        run.writer.add_scalar(f"TopS_{split}/{sel}", m[f"top_s_{sel}"], iteration)
