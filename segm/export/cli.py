"""`python -m segm.export CHECKPOINT OUT.onnx`: the command line over `export_model`."""
from __future__ import annotations

import click

from segm import __version__
from segm.data.base import DATASET_CHOICES, variant_normalization
from segm.export.graph import DEFAULT_OPSET, ExportError, check_opset
from segm.export.quantize import MAX_CHANGED_PIXELS, QUANTIZATIONS, check_quantize
from segm.export.schema import LOGITS, OUTPUT_KINDS
from segm.export.sidecar import sidecar_path
from segm.policy_choice import policy_options
from segm.utils.cli import CONTEXT_SETTINGS_WITH_DEFAULTS
from segm.utils.writable import write_error_message


def _check_dataset_options(dataset, data_root, check: bool) -> None:
    """`--dataset`/`--data-root` feed the parity check; refused where they would be ignored."""
    if data_root is not None and dataset is None:
        raise ExportError("--data-root names the folder of --dataset: give --dataset NAME too")
    if dataset is not None and not check:
        raise ExportError("--dataset adds validation images to the parity check, which --no-check skips: "
                          "drop one of them")


def _quantize_options(quantize: str, max_changed_pixels: float | None) -> float:
    """The share of changed labels an int8 export may have; refused without --quantize int8."""
    if max_changed_pixels is not None and quantize == "none":
        raise ExportError("--max-changed-pixels bounds what --quantize int8 changes: give --quantize int8 too")
    max_changed_pixels = MAX_CHANGED_PIXELS if max_changed_pixels is None else max_changed_pixels
    check_quantize(quantize, max_changed_pixels)
    return max_changed_pixels


def _real_crops(model, dataset, data_root, normalization: str, batch: int):
    """Two batches of validation images resized to the crop, or None without a dataset."""
    if dataset is None:
        return None
    from segm.bench.inputs import load_images
    from segm.data.base import canonical_name

    return load_images(canonical_name(dataset), "val", 2 * batch, model.crop_size, normalization, data_root)


def _load(checkpoint: str, policy: dict):
    from segm.model.factory import load_model
    from segm.policy_choice import apply_policy_choice, policy_choice

    return apply_policy_choice(*load_model(checkpoint), policy_choice(**policy))


@click.command(context_settings=CONTEXT_SETTINGS_WITH_DEFAULTS)
@click.version_option(__version__, "--version", prog_name="segm.export")
@click.argument("checkpoint", type=str)
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--batch-size", type=int, default=None, help="The batch the model is exported for [default: 2].")
@click.option("--dynamic-batch", is_flag=True,
              help="Export for any batch size (not for a reduction that fixes its input at export, as the random "
                   "policy does).")
@click.option("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset, 18..25.")
@click.option("--check/--no-check", default=True, help="Compare ONNX Runtime with eager PyTorch before writing.")
@click.option("--dataset", type=click.Choice(DATASET_CHOICES), default=None,
              help="Also check on this dataset's validation images (resized to the crop).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="The --dataset's folder [default: $DATASET/<name>].")
@click.option("--output", type=click.Choice(OUTPUT_KINDS), default=LOGITS,
              help="The graph's first output: logits (B, K, H, W) float32, or labels (B, H, W) int64, their argmax "
                   "over classes computed without full-resolution logits (Segmenter.forward_labels).")
@click.option("--quantize", type=click.Choice(QUANTIZATIONS), default="none",
              help="int8: ONNX Runtime's dynamic quantisation of the encoder's and decoder's matrix products "
                   "(int8 weights, uint8 activations), refused when it changes the label of more than "
                   f"{100 * MAX_CHANGED_PIXELS:g} % of the check's pixels against the fp32 graph.")
@click.option("--max-changed-pixels", type=float, default=None, metavar="FRACTION",
              help=f"With --quantize int8: the largest share of pixels whose label may change, 0..1 "
                   f"[default: {MAX_CHANGED_PIXELS:g}].")
@policy_options
def main(checkpoint, out, batch_size, dynamic_batch, opset, check, dataset, data_root, output, quantize,
         max_changed_pixels, **policy):
    """Export CHECKPOINT (any reduction with a static token count that needs no labels; at its crop
    size) to OUT.onnx, with OUT.json beside it.

    The graph takes normalised float32 images (B, 3, H, W), as the eager model does; the sidecar
    records the normalisation, the batch, the reduction, the first output (logits or labels), the
    quantisation and the parity check's result."""
    from segm.export.write import check_output_path, export_model
    from segm.utils.checkpoint import CheckpointError

    log = lambda s: click.echo(s, err=True)  # noqa: E731
    try:
        if batch_size is not None and dynamic_batch:
            raise ExportError("give --batch-size B or --dynamic-batch, not both")
        batch_size = None if dynamic_batch else (2 if batch_size is None else batch_size)
        if batch_size is not None and batch_size < 1:
            raise ExportError(f"--batch-size must be ≥ 1, got {batch_size}")
        check_opset(opset)
        max_changed_pixels = _quantize_options(quantize, max_changed_pixels)
        _check_dataset_options(dataset, data_root, check or quantize != "none")
        check_output_path(out)
        model, variant = _load(checkpoint, policy)
        norm = variant_normalization(variant)
        real = _real_crops(model, dataset, data_root, norm, batch_size or 1)
        side = export_model(model, variant, out, normalization=norm, batch_size=batch_size, opset=opset,
                            check=check, real=real, output=output, quantize=quantize,
                            max_changed_pixels=max_changed_pixels, log=log)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, CheckpointError) as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    except OSError as e:  # writing the pair: disk full, permission denied (nothing was replaced)
        raise click.ClickException(write_error_message(e, e.filename or out)) from None
    reduction = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in side["reducer"].items())
    kind = ("; int8" if side["quantization"] else "") + ("; labels" if side["output"] != LOGITS else "")
    click.echo(f"wrote {out} and {sidecar_path(out)} ({reduction}; input {side['input']['shape']}{kind})")
