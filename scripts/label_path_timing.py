"""The label path with and without skipping the cells one class wins (`segm.model.labels`),
timed interleaved in one process on class scores of three kinds:

- random scores, as an untrained model (the benchmark's random-weight ViTs) gives: no cell is
  won outright, so the plain path runs;
- "regions": a confident model's scores, one class 4 above the others over square regions of
  `--region` × `--region` patches, noise of 0.3 everywhere;
- a checkpoint's own scores on a dataset's validation images (`--model-path`, `--dataset`), when given.

    python scripts/label_path_timing.py --classes 150 --grid 32 --batch-size 2 --region 4 --region 8

Labels from both ways are checked equal before anything is timed.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from segm.utils.cli import CONTEXT_SETTINGS


def region_scores(batch: int, classes: int, grid: int, region: int, seed: int = 0) -> torch.Tensor:
    """(B, K, G, G) channels-last scores of a confident model: square regions of one class."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (batch, 1, -(-grid // region), -(-grid // region)), generator=g).float()
    blobs = F.interpolate(coarse, scale_factor=region, mode="nearest")[:, 0, :grid, :grid].long()
    scores = 4 * F.one_hot(blobs, classes).float() + 0.3 * torch.randn(batch, grid, grid, classes, generator=g)
    return scores.permute(0, 3, 1, 2)


def checkpoint_scores(model_path: str, dataset: str, data_root: str, count: int, grid: int) -> tuple:
    """(scores, patch): a checkpoint's class scores on `count` validation images of `dataset` (its
    test pipeline, resized to grid patches a side, as `segm.bench --inputs` reads them)."""
    from segm.bench.inputs import load_images
    from segm.data.base import variant_normalization
    from segm.model.factory import load_model

    model, variant = load_model(model_path)
    size = grid * model.patch_size
    x = load_images(dataset, "val", count, (size, size), variant_normalization(variant), data_root)
    with torch.no_grad():
        return model.eval().forward_scores(x)[0], model.patch_size


def time_both(masks: torch.Tensor, patch: int, rounds: int) -> dict:
    import segm.model.labels as labels

    shortcut = labels.dominant_cells
    ways = {"plain": lambda m, p: None, "shortcut": shortcut}

    def run(way):
        labels.dominant_cells = ways[way]
        try:
            start = time.perf_counter()
            out = labels.labels_from_scores(masks, patch)
            return time.perf_counter() - start, out
        finally:
            labels.dominant_cells = shortcut

    if not torch.equal(run("plain")[1], run("shortcut")[1]):
        raise SystemExit("the two ways gave different labels: a bug, please report it")
    times = {way: [] for way in ways}
    for _ in range(rounds):
        for way in ways:
            times[way].append(run(way)[0])
    dominant = shortcut(masks, patch)
    claimed = float((dominant >= 0).float().mean()) if dominant is not None else 0.0
    return {"claimed": claimed, **{w: statistics.median(t) * 1e3 for w, t in times.items()},
            "paired": statistics.median(a / b for a, b in zip(times["plain"], times["shortcut"]))}


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--classes", default=150, show_default=True)
@click.option("--grid", default=32, show_default=True, help="Patch grid side (512 px at patch 16).")
@click.option("--batch-size", default=2, show_default=True)
@click.option("--region", multiple=True, type=int, default=(4, 8, 16), show_default=True,
              help="Region side in patches; repeatable.")
@click.option("--model-path", default=None, help="Also time this checkpoint's scores on --dataset's validation images.")
@click.option("--dataset", default=None, help="Dataset name for --model-path (e.g. synthetic).")
@click.option("--data-root", default=None, help="The dataset's folder.")
@click.option("--threads", default=2, show_default=True)
@click.option("--rounds", default=15, show_default=True)
def main(classes, grid, batch_size, region, model_path, dataset, data_root, threads, rounds):
    torch.set_num_threads(threads)
    cases = {"random scores": (torch.randn(batch_size, grid, grid, classes).permute(0, 3, 1, 2), 16)}
    for r in region:
        cases[f"regions of {r}×{r} patches"] = region_scores(batch_size, classes, grid, r), 16
    if model_path is not None:
        if dataset is None:
            raise click.UsageError("--model-path needs --dataset")
        cases[f"checkpoint {Path(model_path).parent.name}, {dataset} images"] = checkpoint_scores(
            model_path, dataset, data_root, batch_size, grid)
    print(f"| scores (B, K, grid) | cells won outright | plain ms | skipping ms | paired |\n|---|---|---|---|---|")
    for name, (masks, patch) in cases.items():
        r = time_both(masks, patch, rounds)
        print(f"| {name} {tuple(masks.shape[:2]) + tuple(masks.shape[2:])} | {r['claimed']:.1%} | "
              f"{r['plain']:.1f} | {r['shortcut']:.1f} | {r['paired']:.2f}× |")


if __name__ == "__main__":
    main()
