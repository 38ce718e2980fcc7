"""Sliding-window mIoU of a checkpoint on a validation set (docs/DESIGN.md, "Evaluation").

    python -m segm.eval.miou runs/NAME/checkpoint.pth ade20k [--singlescale|--multiscale]
    torchrun --nproc_per_node 4 -m segm.eval.miou runs/NAME/checkpoint.pth cityscapes

Works on this project's checkpoints and on reference ones (`checkpoint.pth` with the run's
`variant.yml` beside it). Prints the scores and the per-class table (as mmseg's evaluation) and
writes `scores_ss.yml` / `scores_ms.yml` next to the checkpoint, in the reference's format (keys
sorted as its `yaml.dump` does) plus `per_class`: [{name, iou, acc}, ...]. A partial evaluation
(`--frac-dataset F` < 1) writes `scores_ss_fracF.yml`, recording `frac_dataset` and `num_images`.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click
from torch.utils.data import DataLoader, DistributedSampler

from segm import __version__
from segm.config import dataset_dir, dataset_preset, dump_yaml
from segm.data import canonical_name
from segm.data.base import variant_normalization
from segm.data.base import DATASET_CHOICES
from segm.eval.evaluate import AMP_DTYPES, SAVE_FORMATS
from segm.eval.window import resolve_window
from segm.metrics import per_class_table
from segm.policy_choice import PolicyChoice, apply_policy_choice, policy_choice, policy_options
from segm.utils.checkpoint import CheckpointError
from segm.utils.cli import CONTEXT_SETTINGS
from segm.utils.device import DEVICE_HELP
from segm.utils.distributed import barrier, cleanup, init_distributed, is_main_process
from segm.utils.writable import NotWritableError, check_writable, write_error_message

# Errors that are the user's to fix: reported as one line, without a traceback.
USER_ERRORS = (FileNotFoundError, ValueError, CheckpointError)


def resolve_settings(variant: dict, model, dataset: str, *, im_size=None, window_size=None, window_stride=None,
                     data_root=None, classes_file=None) -> dict:
    """Fills the command's defaults from configs/config.yml and the checkpoint's variant (the
    window and stride: `segm.eval.window.resolve_window`). The image size defaults to the one
    the model was trained at on this dataset, else the dataset preset's."""
    dkw = variant.get("dataset_kwargs") or {}
    preset = dataset_preset(dataset)
    window_size, window_stride = resolve_window(model, variant, dataset, window_size, window_stride)
    same_dataset = dkw.get("dataset") is not None and _same_name(dkw["dataset"], dataset)
    if im_size is None:
        im_size = (same_dataset and dkw.get("image_size")) or preset.get("im_size") or dkw.get("image_size")
    if im_size is None:
        raise ValueError(f"no default image size for dataset {dataset!r}: pass --im-size")
    if int(im_size) < 1:
        raise ValueError(f"--im-size must be positive, got {im_size}")
    normalization = variant_normalization(variant)
    # The training run's own data folder, when evaluating on the dataset it was trained on.
    if data_root is None and same_dataset:
        data_root = dkw.get("data_root")
    if classes_file is None and same_dataset:
        classes_file = dkw.get("classes_file")
    return dict(im_size=int(im_size), window_size=int(window_size), window_stride=int(window_stride),
                normalization=normalization, data_root=data_root, classes_file=classes_file)


def _same_name(a: str, b: str) -> bool:
    try:
        return canonical_name(a) == canonical_name(b)
    except ValueError:
        return False


def scores_for_yaml(scores: dict, multiscale: bool, policy: dict | None = None, settings: dict | None = None,
                    class_names=None, reducer: dict | None = None) -> dict:
    """The reference's scores file: sorted keys, `inference` = single_scale | multi_scale; plus
    the token-sharing policy and budget that produced the scores (`policy`, the reference's
    spelling) and the whole token reduction (`reducer`, `Reducer.describe`), the evaluation `settings`
    (dataset, im_size, window_size, window_stride) and, with `class_names`, `per_class`:
    [{name, iou, acc}, ...] in class order."""
    out = {
        "cat_iou": list(scores["cat_iou"]),
        "inference": "multi_scale" if multiscale else "single_scale",
        "mean_accuracy": scores["mean_accuracy"],
        "mean_iou": scores["mean_iou"],
        "pixel_accuracy": scores["pixel_accuracy"],
    }
    if policy is not None:
        out["policy"] = policy
    if reducer is not None:
        out["reducer"] = reducer
    if settings is not None:
        out.update({k: settings[k] for k in ("dataset", "im_size", "window_size", "window_stride")})
    if class_names is not None:
        out["per_class"] = [{"name": n, "iou": iou, "acc": acc}
                            for n, iou, acc in zip(class_names, scores["cat_iou"], scores["cat_acc"])]
    return dict(sorted(out.items()))


def scores_path(model_dir: Path, multiscale: bool, choice: PolicyChoice | None, model,
                frac_dataset: float = 1.0) -> Path:
    """`scores_ss.yml`/`scores_ms.yml`; with a reduction chosen on the command line
    `scores_ss_<reducer tag>.yml` (CTS: `scores_ss_<policy>_s<S>.yml`), and for a part of the
    dataset `..._frac<F>.yml`, so the checkpoint's own full scores are never replaced."""
    name = "scores_ms" if multiscale else "scores_ss"
    if choice is not None:
        name += f"_{model.reducer.tag()}"
    if frac_dataset != 1.0:
        name += f"_frac{frac_dataset:g}"
    return model_dir / f"{name}.yml"


def _zip_images(images_dir: Path) -> Path:
    """`images.zip` beside the images folder, written atomically."""
    target = images_dir.with_suffix(".zip")
    with tempfile.TemporaryDirectory(dir=images_dir.parent) as tmp:
        archive = shutil.make_archive(str(Path(tmp) / "images"), "zip", root_dir=images_dir)
        Path(archive).replace(target)
    return target


def _write_scores(record: dict, path: Path, images_dir: Path | None) -> None:
    target = path  # named in the error rather than the temporary file the write failed on
    try:
        dump_yaml(record, path)
        if images_dir is not None and images_dir.is_dir():
            target = images_dir.with_suffix(".zip")
            _zip_images(images_dir)
    except OSError as e:
        raise NotWritableError(write_error_message(e, target)) from None


def evaluate_checkpoint(model_path, dataset, *, multiscale=False, im_size=None, window_size=None,
                        window_stride=None, window_batch_size=4, save_images=False, blend=True,
                        frac_dataset=1.0, data_root=None, classes_file=None, device=None,
                        amp_dtype=None, num_workers=2, progress=True, policy: PolicyChoice | None = None,
                        save_format: str = "overlay") -> dict:
    """Library form of the command: evaluates, writes the scores file (rank 0), returns the
    scores (with `inference_time`, the resolved settings under `settings` and the dataset's
    `class_names`). `policy`: run the checkpoint with another token-sharing policy and budget
    (the file is not modified). `save_format`: saved images as overlays or as index maps in
    the dataset's label space (`segm.eval.evaluate.SAVE_FORMATS`)."""
    from segm.data import build_dataset, dataset_info, val_collate
    from segm.eval.evaluate import evaluate_dataset
    from segm.model.factory import load_model

    dataset = canonical_name(dataset)
    if window_batch_size < 1:
        raise ValueError(f"--window-batch-size must be >= 1, got {window_batch_size}")
    model_path = Path(model_path)
    dist_info = init_distributed(device=device)  # `device` None: cuda:local_rank when available, else the CPU
    device = dist_info.device

    model, variant = load_model(model_path)
    model, variant = apply_policy_choice(model, variant, policy)
    settings = resolve_settings(variant, model, dataset, im_size=im_size, window_size=window_size,
                                window_stride=window_stride, data_root=data_root, classes_file=classes_file)
    if settings["data_root"] is None and dataset != "custom":
        dataset_dir()  # $DATASET unset: a usage error before the model runs
    info = dataset_info(dataset, data_root=settings["data_root"], classes_file=settings["classes_file"])
    if info.n_cls != model.n_cls:
        raise ValueError(
            f"the model predicts {model.n_cls} classes but dataset {dataset} has {info.n_cls}: "
            "evaluate on the dataset it was trained on (or pass the right --classes)"
        )
    if model.needs_labels:
        model.reducer.label_dataset(dataset)
    db = build_dataset(dataset, "val", im_size=settings["im_size"], crop_size=settings["window_size"],
                       normalization=settings["normalization"], data_root=settings["data_root"],
                       classes_file=settings["classes_file"], multiscale=multiscale)
    sampler = DistributedSampler(db, shuffle=False) if dist_info.distributed else None
    loader = DataLoader(db, batch_size=1, shuffle=False, sampler=sampler, num_workers=num_workers,
                        collate_fn=val_collate, pin_memory=device.type == "cuda")
    model.to(device)

    model_dir = model_path if model_path.is_dir() else model_path.parent
    if is_main_process():  # before the evaluation, not after it
        check_writable(model_dir, "the scores file goes beside the checkpoint, in",
                       fix="copy the checkpoint and its variant.yml to a folder you can write to")
    images_dir = model_dir / "images" if save_images else None
    scores = evaluate_dataset(
        model, loader, n_cls=model.n_cls, window_size=settings["window_size"],
        window_stride=settings["window_stride"], window_batch_size=window_batch_size, device=device,
        amp_dtype=amp_dtype, frac_dataset=frac_dataset, progress=progress, save_dir=images_dir,
        palette=info.palette, blend=blend, save_format=save_format,
    )
    barrier()
    scores["policy"] = model.reducer.policy_record()
    scores["reducer"] = model.describe_reduction()
    scores["reducer_summary"] = model.reducer.summary()
    if is_main_process():
        record = {**scores["policy"], "policynet_ckpt": variant["net_kwargs"].get("policynet_ckpt")}
        out = scores_for_yaml(scores, multiscale, record, {**settings, "dataset": dataset}, info.class_names,
                              scores["reducer"])
        if frac_dataset != 1.0:  # a partial evaluation says so, in its own file
            out = dict(sorted({**out, "frac_dataset": frac_dataset, "num_images": scores["num_images"]}.items()))
        _write_scores(out, scores_path(model_dir, multiscale, policy, model, frac_dataset), images_dir)
    scores["settings"] = settings
    scores["class_names"] = list(info.class_names)
    return scores


@click.command(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="segm.eval.miou")
@click.argument("model_path", type=str)
@click.argument("dataset_name", type=click.Choice(DATASET_CHOICES, case_sensitive=False), metavar="DATASET_NAME")
@click.option("--im-size", default=None, type=int,
              help="Test short side (default: the size the model was trained at when DATASET_NAME is its "
                   "training dataset, else the dataset preset of configs/config.yml).")
@click.option("--multiscale/--singlescale", default=False, show_default=True,
              help="Multi-scale: 12 views (ratios 0.5-1.75, each also flipped), probabilities averaged.")
@click.option("--blend/--no-blend", default=True, show_default=True, help="Blend saved images with the input.")
@click.option("--window-size", default=None, type=int, help="Default: the checkpoint's crop size.")
@click.option("--window-stride", default=None, type=int,
              help="Default: config.yml per dataset (ade20k 512, cityscapes 512, pascal_context 320).")
@click.option("--window-batch-size", default=4, show_default=True, type=int, help="Windows per forward pass.")
@click.option("--save-images/--no-save-images", default=False, show_default=True,
              help="Write MODEL_DIR/images/{input,pred,gt} and images.zip.")
@click.option("--format", "save_format", type=click.Choice(SAVE_FORMATS), default="overlay", show_default=True,
              help="--save-images as colour overlays, or as index maps in the dataset's label space "
                   "(images/pred only; ADE20K 1..150, Cityscapes label ids), as test servers take them.")
@click.option("-frac-dataset", "--frac-dataset", default=1.0, show_default=True, type=float,
              help="Fraction of the dataset to evaluate, in (0, 1].")
@click.option("--data-root", default=None, type=str, help="The dataset's folder (default: $DATASET/<name>).")
@click.option("--classes", "classes_file", default=None, type=str, help="Classes file (custom datasets).")
@click.option("--device", default=None, type=str, help=f"{DEVICE_HELP} (default: auto, cuda:LOCAL_RANK).")
@click.option("--amp-dtype", type=click.Choice(list(AMP_DTYPES)), default="none", show_default=True,
              help="Autocast the forward passes to this dtype.")
@click.option("--num-workers", default=2, show_default=True, type=int, help="Data loading processes.")
@policy_options
def main(model_path, dataset_name, im_size, multiscale, blend, window_size, window_stride, window_batch_size,
         save_images, save_format, frac_dataset, data_root, classes_file, device, amp_dtype, num_workers, **policy):
    """Evaluate MODEL_PATH (checkpoint.pth, variant.yml beside it) on DATASET_NAME
    (ade20k, pascal_context, cityscapes, synthetic, custom)."""
    if save_format == "index" and not save_images:
        raise click.UsageError("--format index chooses how --save-images writes: add --save-images")
    try:
        choice = policy_choice(**policy)
        scores = evaluate_checkpoint(
            model_path, dataset_name, multiscale=multiscale, im_size=im_size, window_size=window_size,
            window_stride=window_stride, window_batch_size=window_batch_size, save_images=save_images,
            blend=blend, frac_dataset=frac_dataset, data_root=data_root, classes_file=classes_file,
            device=device, amp_dtype=AMP_DTYPES[amp_dtype], num_workers=num_workers, policy=choice,
            save_format=save_format,
        )
        main_process = is_main_process()
    except USER_ERRORS as e:
        from segm.data.io import user_message

        raise click.ClickException(user_message(e).splitlines()[0]) from None
    finally:
        cleanup()
    if main_process:
        s = scores["settings"]
        print(f"window {s['window_size']}, stride {s['window_stride']}, im_size {s['im_size']}, "
              f"{scores['num_images']} images; {scores['reducer_summary']}")
        for key in ("pixel_accuracy", "mean_accuracy", "mean_iou"):
            print(f"{key}: {scores[key]}")
        print(f"inference: {'multi_scale' if multiscale else 'single_scale'}")
        print(f"inference_time: {scores['inference_time']:.1f} s")
        print(per_class_table(scores["class_names"], scores))


if __name__ == "__main__":
    main()
