"""Share a trained model as one folder: `python -m segm.share CHECKPOINT OUT_DIR`.

Writes `model.safetensors` (the weights alone), `config.json` (the model description, class
names and palette, normalisation, crop, policy and budget) and a model card `README.md`, in the
layout of Hugging Face's `PyTorchModelHubMixin`. The folder appears complete or not at all (it
is written beside OUT_DIR, then renamed), and it carries no path of yours (policy checkpoint,
pretrained weights, data root): the policy network travels in the safetensors. Every command
that takes a checkpoint takes the folder too (`segm.load_model(OUT_DIR)`); loading never
unpickles and reads nothing outside the folder. To publish it:
`huggingface-cli upload USER/NAME OUT_DIR` (or `huggingface_hub.upload_folder`).
"""
from __future__ import annotations

import click

from segm import __version__
from segm.utils.cli import CONTEXT_SETTINGS


@click.command(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="segm.share")
@click.argument("checkpoint", type=str)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True,
              help="Replace a non-empty OUT_DIR as a whole (and remove what a killed share left beside it).")
def main(checkpoint, out_dir, overwrite):
    """Export CHECKPOINT (checkpoint.pth with variant.yml, or a shared folder) to OUT_DIR."""
    from segm.model.factory import load_model
    from segm.model.hub import share_model
    from segm.utils.checkpoint import CheckpointError
    from segm.utils.writable import check_writable

    try:
        check_writable(out_dir, "OUT_DIR")  # before the model is loaded
        model, variant = load_model(checkpoint)
        out = share_model(model, variant, out_dir, overwrite=overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, CheckpointError, PermissionError) as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    click.echo(f"wrote {out}: model.safetensors, config.json, README.md")


if __name__ == "__main__":
    main()
