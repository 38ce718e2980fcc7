"""Evaluate a policy-network checkpoint on its own.

    python -m policynet.eval runs/policynet/NAME/model.pth --dataset ade20k [--split val]

Prints accuracy, precision/recall of the "shareable" class and the top-S purity of the policy
next to a seeded random choice and the oracle, and writes the same numbers as JSON.
When the checkpoint sits in a training run folder, its `config.json` (read by
`segm.model.spec.read_policy_record`) supplies the defaults of --backbone and, for the dataset
it was trained on, --crop-size and --num-shared (the S the run reported, at the same crop).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import click

from segm.data.base import DATASET_CHOICES, canonical_name
from segm.model.policy import build_policy, load_policy_checkpoint
from segm.model.reduction.rules import ModelConfigError
from segm.model.spec import DEFAULT_POLICY_BACKBONE, read_policy_record
from segm.utils.checkpoint import CheckpointError
from segm.utils.cli import CONTEXT_SETTINGS_WITH_DEFAULTS
from segm.utils.device import resolve_device

from .evaluation import build_eval_set, eval_loader, evaluate
from .metrics import SELECTORS, check_budget
from .records import write_json


def evaluate_checkpoint(ckpt, dataset: str, *, split: str = "val", data_root=None, classes_file=None,
                        backbone: str | None = None, crop_size: int | None = None, s: int | None = None,
                        batch_size: int = 10, num_workers: int = 4, device=None, seed: int = 0,
                        max_images: int | None = None) -> dict:
    ckpt = Path(ckpt)
    name = canonical_name(dataset)
    with _backbone_option():
        run = read_policy_record(ckpt) or {}
    if backbone is None:
        backbone = run.get("backbone", DEFAULT_POLICY_BACKBONE)
    same_data = run.get("dataset") is not None and canonical_name(run["dataset"]) == name
    if crop_size is None and same_data and name in ("synthetic", "custom"):
        crop_size = run.get("crop")
    dev = resolve_device(device)
    model = build_policy(backbone)
    with _backbone_option():
        load_policy_checkpoint(model, ckpt)
    model.to(dev)
    data = build_eval_set(name, split, data_root=data_root, classes_file=classes_file, crop_size=crop_size)
    crop = data.geometry.size
    if s is None and same_data and run.get("crop") == crop:
        s = run.get("num_shared_eval")
    s = check_budget(s, crop, name)
    indices = None if max_images is None else list(range(min(max_images, len(data))))
    loader = eval_loader(data, batch_size, num_workers, dev, indices=indices)
    metrics = evaluate(model, loader, name, s, dev, seed=seed)
    return {"checkpoint": str(ckpt), "dataset": name, "split": split, "backbone": backbone, "crop": crop, **metrics}


@contextlib.contextmanager
def _backbone_option():
    """The policy rules' errors name this command's option, --backbone (the segmenter's
    commands spell it --policy-backbone)."""
    try:
        yield
    except ModelConfigError as e:
        raise ModelConfigError(str(e).replace("--policy-backbone", "--backbone")) from None


def format_table(r: dict) -> str:
    rows = [
        f"policy net {r['checkpoint']} on {r['dataset']} {r['split']} ({r['images']} images, crop {r['crop']}, "
        f"{r['cells']} labelled cells)",
        f"  accuracy              {r['accuracy']:.4f}",
        f"  precision (class 1)   {r['precision']:.4f}",
        f"  recall (class 1)      {r['recall']:.4f}",
        f"  shareable fraction    {r['shareable_fraction']:.4f}",
        f"  top-S purity, S={r['num_shared']}:",
    ]
    rows += [f"    {sel:<8}            {r[f'top_s_{sel}']:.4f}" for sel in SELECTORS]
    return "\n".join(rows)


@click.command(context_settings=CONTEXT_SETTINGS_WITH_DEFAULTS)
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--dataset", type=click.Choice(DATASET_CHOICES), required=True, help="Dataset to evaluate on.")
@click.option("--split", type=click.Choice(["val", "train"]), default="val", help="Split to evaluate on.")
@click.option("--data-root", "--data_root", "data_root", default=None, type=click.Path(),
              help="The dataset's folder (default $DATASET/<dataset>).")
@click.option("--classes", default=None, type=click.Path(), help="classes file (custom)")
@click.option("--backbone", default=None, help=f"default: the run's config.json, else {DEFAULT_POLICY_BACKBONE}")
@click.option("--crop-size", "--crop_size", "crop_size", default=None, type=int, help="synthetic/custom only")
@click.option("--num-shared", "--num_shared", "num_shared", default=None, type=click.IntRange(min=0),
              help="S (default: the run's config.json on its dataset and crop, else the dataset's budget)")
@click.option("--batch-size", "--batch_size", "batch_size", default=10, type=click.IntRange(min=1),
              help="Images per forward pass.")
@click.option("--num-workers", "--num_workers", "num_workers", default=4, type=click.IntRange(min=0),
              help="Data loading processes.")
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available).")
@click.option("--seed", default=0, type=int, help="seed of the random baseline")
@click.option("--max-images", default=None, type=click.IntRange(min=1), help="evaluate the first N images only")
@click.option("--output", "-o", default=None, type=click.Path(dir_okay=False),
              help="JSON file (default: eval_<dataset>_<split>.json next to the checkpoint)")
def main(checkpoint, dataset, split, data_root, classes, backbone, crop_size, num_shared, batch_size,
         num_workers, device, seed, max_images, output):
    """Report accuracy and top-S superpatch quality of a policy-network CHECKPOINT."""
    try:
        result = evaluate_checkpoint(checkpoint, dataset, split=split, data_root=data_root, classes_file=classes,
                                     backbone=backbone, crop_size=crop_size, s=num_shared, batch_size=batch_size,
                                     num_workers=num_workers, device=device, seed=seed, max_images=max_images)
        out = Path(output) if output else Path(checkpoint).parent / f"eval_{result['dataset']}_{split}.json"
        write_json(out, result)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        from segm.data.io import user_message

        raise click.ClickException(user_message(e)) from None
    click.echo(format_table(result))
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
