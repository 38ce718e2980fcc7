"""The command line: `python -m segm.train` (options and exit codes)."""
from __future__ import annotations

from pathlib import Path

import click

from segm import __version__
from segm.config import load_config
from segm.data.base import DATASET_CHOICES
from segm.model.spec import POLICY_METHODS
from segm.train.loss import NonFiniteLossError
from segm.train.options import AMP_DTYPES, REFERENCE_WORKERS, ConfigError
from segm.train.run import train
from segm.utils.cli import CONTEXT_SETTINGS_WITH_DEFAULTS
from segm.utils.threads import THREADS_HELP, WORKERS_HELP

_PRESET = " [default: the dataset preset in configs/config.yml]"
_PRESETS = load_config()  # the backbone and decoder choices


@click.command(context_settings=CONTEXT_SETTINGS_WITH_DEFAULTS)
@click.version_option(__version__, "--version", prog_name="segm.train")
@click.option("--log-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoint.pth, variant.yml, log.txt, TensorBoard events.")
@click.option("--dataset", required=True, type=click.Choice(DATASET_CHOICES), help="Training dataset.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The dataset's own folder [default: $DATASET/<dataset>]; required for custom.")
@click.option("--classes", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Classes file (YAML) of a custom dataset [default: <data-root>/classes.yml].")
@click.option("--im-size", type=int, default=None, help="Resize base (short side)." + _PRESET)
@click.option("--crop-size", type=int, default=None, help="Training crop = the encoder's token grid." + _PRESET)
@click.option("--window-size", type=int, default=None, help="Evaluation window [default: the crop].")
@click.option("--window-stride", type=int, default=None, help="Evaluation stride." + _PRESET)
@click.option("--backbone", required=True, type=click.Choice(list(_PRESETS["model"])),
              help="A `model:` preset of configs/config.yml, e.g. vit_small_patch16_384.")
@click.option("--decoder", default="mask_transformer", type=click.Choice(list(_PRESETS["decoder"])),
              help="A `decoder:` preset of configs/config.yml.")
@click.option("--encoder-layers", type=int, default=None,
              help="Override the backbone depth (for smoke tests and ablations).")
@click.option("--decoder-layers", type=int, default=2, help="Mask-transformer layers.")
@click.option("--pretrained", default="auto",
              help="Encoder weights: a .npz/.pth/.safetensors file, a timm name, 'auto' (the backbone's "
                   "ImageNet-21k weights via timm, as the reference) or 'none'. Ignored when resuming.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", help="sgd = SGD, Nesterov, momentum 0.9.")
@click.option("--scheduler", type=click.Choice(["polynomial"]), default="polynomial",
              help="Per-iteration polynomial decay, power 0.9.")
@click.option("--weight-decay", type=float, default=0.0,
              help="SGD/AdamW weight decay (biases, 1-D parameters, position embedding and tokens exempt).")
@click.option("--dropout", type=float, default=0.0, help="Encoder dropout.")
@click.option("--drop-path", type=float, default=0.1, help="Encoder stochastic-depth rate.")
@click.option("--batch-size", type=int, default=None, help="Global batch, split over the processes." + _PRESET)
@click.option("--epochs", type=int, default=None, help="Training epochs." + _PRESET)
@click.option("--iterations", type=int, default=None, help="Train for N iterations instead of --epochs.")
@click.option("-lr", "--learning-rate", type=float, default=None, help="Base learning rate." + _PRESET)
@click.option("--warmup-iter", type=int, default=0, help="Linear warm-up iterations.")
@click.option("--min-lr", type=float, default=1e-5, help="Learning-rate floor of the schedule.")
@click.option("--normalization", type=click.Choice(["vit", "deit"]), default=None,
              help="Input normalisation [default: the backbone preset's].")
@click.option("--eval-freq", type=int, default=None,
              help="Evaluate when epoch % N == 0 and at the end (0: only at the end)." + _PRESET)
@click.option("--final-eval/--no-final-eval", default=True, show_default=True,
              help="Evaluate at the end of training; --no-final-eval when a segm.eval.miou run follows anyway.")
@click.option("--amp/--no-amp", default=False, help="Mixed precision (autocast).")
@click.option("--amp-dtype", type=click.Choice(list(AMP_DTYPES)), default="fp16",
              help="Autocast dtype; fp16 uses a gradient scaler.")
@click.option("--resume/--no-resume", default=None,
              help="Resume from --log-dir/checkpoint.pth [default: resume when the folder holds the same "
                   "run]. An explicit --resume continues a run whose settings changed.")
@click.option("--overwrite", is_flag=True, help="Discard the run in --log-dir and start over.")
@click.option("--policy-method", type=click.Choice(POLICY_METHODS), default=None,
              help="Which superpatches share a token (CTS); no_sharing = plain Segmenter [default: policy_net; "
                   "no_sharing with --reducer].")
@click.option("--num-tokens-notshared", type=int, default=None, help="U (checked: U = N - 4S).")
@click.option("--num-tokens-shared", type=int, default=None, help="S, shared superpatches per image.")
@click.option("--token-reduction", type=float, default=None, help="Reduction rho instead of S: S = round(rho*N/3).")
@click.option("--policynet-ckpt", type=str, default=None, help="Policy-network model.pth (policy_net).")
@click.option("--policy-backbone", type=str, default=None,
              help="The policy network's timm backbone [default: as recorded in the config.json beside "
                   "--policynet-ckpt, else efficientnet_lite0].")
@click.option("--reducer", type=str, default=None, metavar="NAME[:KEY=VALUE,...]",
              help="Train with this registered token reducer (e.g. algm, algm:mode=reference); beside a sharing "
                   "--policy-method it acts on CTS's tokens.")
@click.option("--layer-norm-eps", type=float, default=None, help="LayerNorm eps [default: 1e-5, as the reference].")
@click.option("--seed", type=int, default=0, help="Seeds weights, data order and augmentation.")
@click.option("--num-workers", type=int, default=None, help=WORKERS_HELP.format(reference=REFERENCE_WORKERS))
@click.option("--threads", type=int, default=None, help=THREADS_HELP)
@click.option("--ckpt-every", type=int, default=1000,
              help="Also checkpoint every N iterations (0: at epoch ends only).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              help="auto: cuda:LOCAL_RANK when CUDA is available, else the CPU.")
@click.option("--deterministic", is_flag=True,
              help="Deterministic algorithms (bit-exact on CPU; a few CUDA kernels have no deterministic version).")
def main(**options):
    """Train Segmenter (+ CTS) with the reference recipe. Re-running the same command resumes."""
    from segm.data.io import DataError, user_message
    from segm.utils.checkpoint import CheckpointError
    from segm.utils.writable import is_out_of_space, write_error_message

    try:
        train(options)
    except NonFiniteLossError as e:
        err = click.ClickException(str(e))
        err.exit_code = 3
        raise err from None
    except (ConfigError, DataError, CheckpointError) as e:
        raise click.ClickException(user_message(e)) from None
    except OSError as e:  # the run folder's disk filled up while writing a log or the settings
        if not is_out_of_space(e):
            raise
        raise click.ClickException(f"{write_error_message(e, e.filename or options['log_dir'])}; training "
                                   "stopped (run the command again to resume from the last checkpoint)") from None
