"""`python -m segm.bench`: the command line over `run_benchmark`."""
from __future__ import annotations

from pathlib import Path

import click

from segm import __version__
from segm.bench.report import format_table, plot_sweep, write_json
from segm.bench.run import run_benchmark
from segm.bench.settings import MATMUL_SIZE, BenchConfig, BenchError
from segm.config import load_config
from segm.export.schema import LOGITS, OUTPUT_KINDS
from segm.utils.checkpoint import CheckpointError
from segm.utils.cli import CONTEXT_SETTINGS_WITH_DEFAULTS
from segm.utils.device import DEVICE_HELP
from segm.utils.host_memory import REUSE_MEMORY_HELP, HostMemoryError

_PRESETS = load_config()  # the backbone and decoder choices


def _parse_sweep(text: str | None) -> tuple:
    if not text:
        return ()
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise BenchError(f"--sweep takes comma-separated reductions like 0,0.1,0.3, got {text!r}") from None


def _check_output(path, option: str) -> None:
    if path is not None and not Path(path).parent.is_dir():
        raise BenchError(f"{option} {path}: folder {Path(path).parent} does not exist")


def _config(overrides: dict, sweep: str | None, kw: dict) -> BenchConfig:
    """The settings from the command line; a checkpoint replaces the backbone preset."""
    cfg = BenchConfig(overrides={k: v for k, v in overrides.items() if v is not None}, sweep=_parse_sweep(sweep),
                      **kw)
    if kw["model_path"] is not None:
        cfg.backbone = None
    return cfg


@click.command(context_settings=CONTEXT_SETTINGS_WITH_DEFAULTS)
@click.version_option(__version__, "--version", prog_name="segm.bench")
@click.option("--backbone", default="vit_small_patch16_384", type=click.Choice(list(_PRESETS["model"])),
              help="Backbone preset (configs/config.yml).")
@click.option("--decoder", default="mask_transformer", type=click.Choice(list(_PRESETS["decoder"])),
              help="Decoder preset (configs/config.yml).")
@click.option("--n-cls", default=150, type=int, help="Classes of the decoder.")
@click.option("--crop", "crop_size", default=512, type=int, help="Crop (input) size in pixels.")
@click.option("--model-path", type=click.Path(), help="Benchmark a checkpoint instead of a preset.")
@click.option("--d-model", type=int, help="Override the preset width.")
@click.option("--n-heads", type=int, help="Override the preset head count.")
@click.option("--n-layers", type=int, help="Override the preset depth.")
@click.option("--decoder-layers", type=int, help="Mask-transformer layers (preset: 2).")
@click.option("--num-shared", "--num-tokens-shared", "num_shared", type=int, help="CTS budget S (default: the reference 30 %, S=103 at 512).")
@click.option("--token-reduction", type=float, help="CTS budget as reduction ρ: S = round(ρN/3).")
@click.option("--with-random", is_flag=True, help="Also time the random policy on the same budget.")
@click.option("--with-content", is_flag=True, help="Also time the training-free content policy on the same budget.")
@click.option("--reducer", "reducers", multiple=True, metavar="NAME[:KEY=VALUE,...]",
              help="Also time a registered token reducer (segm.model.reduction.register_reducer) with these "
                   "settings; repeatable.")
@click.option("--on-cts", "cts_reducers", multiple=True, metavar="NAME[:KEY=VALUE,...]",
              help="Also time a registered reducer that stacks on CTS (e.g. algm) on the tokens of the CTS "
                   "variant (policy network, main budget); repeatable.")
@click.option("--with-onnxruntime", "onnxruntime", is_flag=True,
              help="Also time every variant exported to ONNX, in ONNX Runtime (CPU, fp32).")
@click.option("--onnx-int8", is_flag=True,
              help="With --with-onnxruntime (implied): also time every variant's graph quantised to int8 "
                   "(segm.export --quantize int8).")
@click.option("--sweep", help="Comma-separated reductions to time too, e.g. 0,0.1,0.2,0.3,0.4,0.5.")
@click.option("--batch-size", default=2, type=int, help="Images per timed forward.")
@click.option("--warmup", default=2, type=int, help="Untimed interleaved rounds.")
@click.option("--repeats", default=10, type=int, help="Timed interleaved rounds.")
@click.option("--device", default="auto", help=DEVICE_HELP + ".")
@click.option("--dtype", default="fp32", type=click.Choice(["fp32", "bf16"]), help="bf16 = autocast.")
@click.option("--compile/--no-compile", default=False, help="torch.compile every variant.")
@click.option("--sdpa/--no-sdpa", default=True, help="timm fused attention on/off.")
@click.option("--channels-last", is_flag=True, help="channels_last inputs and conv weights.")
@click.option("--threads", type=int, help="torch.set_num_threads.")
@click.option("--reuse-memory", is_flag=True, help=REUSE_MEMORY_HELP)
@click.option("--inputs", default="random", help="random, or DATASET[:SPLIT] validation images (e.g. ade20k:val).")
@click.option("--data-root", type=click.Path(), help="The dataset's folder (default $DATASET/<name>).")
@click.option("--num-batches", default=4, type=int, help="Distinct input batches, cycled over repeats.")
@click.option("--same-image", is_flag=True, help="Lab protocol: each batch is one image repeated.")
@click.option("--output", type=click.Choice(OUTPUT_KINDS), default=LOGITS, show_default=True,
              help="What an inference call returns: logits (B, K, H, W), or labels (B, H, W) taken band by band "
                   "without full-resolution logits (Segmenter.forward_labels).")
@click.option("--latency", is_flag=True, help="Also time batch 1.")
@click.option("--train-step", is_flag=True, help="Also time a training step (policy frozen).")
@click.option("--memory/--no-memory", default=True, help="Measure peak memory per variant.")
@click.option("--matmul-size", default=MATMUL_SIZE, type=int, help="Side of the fp32 reference matmul.")
@click.option("--seed", default=0, type=int, help="Seeds the weights, inputs and random policy.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Plot images/s against reduction.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def main(d_model, n_heads, n_layers, decoder_layers, sweep, json_path, plot_path, quiet, **kw):
    """Time no_sharing against CTS (and optionally the random and content policies and other
    registered reducers) in one interleaved run."""
    overrides = dict(d_model=d_model, n_heads=n_heads, n_layers=n_layers, decoder_layers=decoder_layers)
    try:
        _check_output(json_path, "--json")
        _check_output(plot_path, "--plot")
        cfg = _config(overrides, sweep, kw)
        log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
        result = run_benchmark(cfg, log=log)
        if json_path:
            write_json(result, json_path)
        if plot_path:
            plot_sweep(result, plot_path)
    except (ValueError, FileNotFoundError, OSError, CheckpointError, HostMemoryError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_table(result))
