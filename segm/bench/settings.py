"""The benchmark's settings (`BenchConfig`) and the checks run on them before any model is built."""
from __future__ import annotations

from dataclasses import dataclass, field

from segm.export.schema import LOGITS, OUTPUT_KINDS  # no torch
from segm.model.reduction import rules
from segm.model.reduction.rules import CTS, NONE, ReductionError
from segm.utils.device import resolve_device

MATMUL_SIZE = 2048

# The variants a run times, named here and nowhere else. BASELINE runs without token reduction:
# speed-ups are against it. CTS_VARIANTS time CTS at the main budget S: (variant name,
# superpatch scorer, the BenchConfig flag that adds it or None for always, plot label); the
# first one's scorer also runs the sweep's budgets, named `<its name>_<reduction>` (cts_0.30).
# `--reducer` variants are named by their reducer's `tag()`.
BASELINE = "no_sharing"
CTS_VARIANTS = (
    ("cts", "policy_net", None, "CTS (policy net)"),
    ("random", "random", "with_random", "random policy"),
    ("content", "content", "with_content", "content policy"),
)
MAIN_SCORER = CTS_VARIANTS[0][1]


class BenchError(ValueError):
    """Invalid benchmark settings."""


@dataclass
class BenchConfig:
    # model: a preset configuration or a checkpoint
    backbone: str | None = "vit_small_patch16_384"
    decoder: str = "mask_transformer"
    n_cls: int = 150
    crop_size: int = 512
    model_path: str | None = None
    overrides: dict = field(default_factory=dict)  # e.g. d_model, n_heads, n_layers, decoder_layers
    # token budgets
    num_shared: int | None = None
    token_reduction: float | None = None
    with_random: bool = False
    with_content: bool = False
    reducers: tuple = ()  # --reducer NAME[:KEY=VALUE,...]: a variant per registered reducer
    cts_reducers: tuple = ()  # --on-cts NAME[:KEY=VALUE,...]: a variant per reducer stacked on the CTS variant
    onnxruntime: bool = False  # also time every variant exported to ONNX, in ONNX Runtime
    onnx_int8: bool = False  # and its graph quantised to int8 (implies onnxruntime)
    sweep: tuple = ()
    # protocol
    batch_size: int = 2
    warmup: int = 2
    repeats: int = 10
    device: str = "cpu"
    dtype: str = "fp32"
    compile: bool = False
    sdpa: bool = True
    channels_last: bool = False
    threads: int | None = None
    reuse_memory: bool = False  # glibc keeps freed memory (segm.utils.host_memory)
    # inputs
    inputs: str = "random"  # or DATASET[:SPLIT]
    data_root: str | None = None
    num_batches: int = 4
    same_image: bool = False  # lab protocol: one image repeated along the batch
    # extra measurements
    latency: bool = False
    train_step: bool = False
    memory: bool = True
    matmul_size: int = MATMUL_SIZE
    seed: int = 0
    output: str = LOGITS  # what an inference call returns: logits (B, K, H, W) or labels (B, H, W),
    # the latter by `Segmenter.forward_labels`, which never holds the (B, K, H, W) logits


def parse_inputs(spec: str) -> tuple[str, str] | None:
    """'random' → None; 'ade20k' or 'ade20k:val' → (dataset, split)."""
    if spec == "random":
        return None
    name, _, split = spec.partition(":")
    from segm.data import canonical_name

    try:
        name = canonical_name(name)
    except ValueError as e:
        raise BenchError(f"--inputs {spec!r}: {e}; or use --inputs random") from None
    split = split or "val"
    if split not in ("train", "val", "test"):
        raise BenchError(f"--inputs {spec!r}: unknown split {split!r}, use DATASET:val (or train, test)")
    return name, split


def parse_reducer(spec: str) -> dict:
    """'NAME' or 'NAME:KEY=VALUE,KEY=VALUE' → the `reducer` entry {name, settings as given}
    (`segm.model.reduction.rules.parse_reducer`); the reducer's own check validates the settings
    against the model's grid. `none` and `cts` are refused: every run has them."""
    try:
        entry = rules.parse_reducer(spec)
    except ReductionError as e:
        raise BenchError(f"--reducer {spec!r}: {e}") from None
    if entry["name"] == NONE:
        raise BenchError(f"--reducer {spec!r}: every run times the model without reduction already")
    if entry["name"] == CTS:
        raise BenchError(f"--reducer {spec!r}: CTS variants come from --num-shared/--token-reduction, "
                         "--with-random, --with-content and --sweep")
    return entry


def check_config(cfg: BenchConfig) -> None:
    """Rejects bad settings before any model is built, and resolves `device` (auto, cuda → cuda:0).
    The token budgets are checked by `resolve_budgets`, which needs the model's token grid."""
    for name, low in (("batch_size", 1), ("repeats", 1), ("warmup", 0), ("num_batches", 1), ("matmul_size", 1)):
        if getattr(cfg, name) < low:
            raise BenchError(f"--{name.replace('_', '-')} must be ≥ {low}, got {getattr(cfg, name)}")
    if cfg.threads is not None and cfg.threads < 1:
        raise BenchError(f"--threads must be ≥ 1 (torch's intra-op threads), got {cfg.threads}")
    if cfg.output not in OUTPUT_KINDS:
        raise BenchError(f"--output must be one of {', '.join(OUTPUT_KINDS)}, got {cfg.output!r}")
    if cfg.dtype not in ("fp32", "bf16"):
        raise BenchError(f"--dtype must be fp32 or bf16, got {cfg.dtype!r}")
    cfg.device = str(resolve_device(cfg.device))  # the project's one device rule
    if cfg.compile and cfg.warmup < 1:
        raise BenchError("--compile needs --warmup ≥ 1 (the first call compiles)")
    if cfg.model_path is None and cfg.backbone is None:
        raise BenchError("give --backbone (a preset) or --model-path (a checkpoint)")
    if cfg.num_shared is not None and cfg.token_reduction is not None:
        raise BenchError("give --num-shared or --token-reduction, not both")
    parse_inputs(cfg.inputs)
    for spec in (*cfg.reducers, *cfg.cts_reducers):
        parse_reducer(spec)
    check_onnx_config(cfg)


def check_onnx_config(cfg: BenchConfig) -> None:
    """`--with-onnxruntime` (segm.bench.onnx) times batched CPU fp32 inference; `--onnx-int8` adds
    the int8 graphs, read against their fp32 twins."""
    cfg.onnxruntime = cfg.onnxruntime or cfg.onnx_int8
    if not cfg.onnxruntime:
        return
    if cfg.device != "cpu" or cfg.dtype != "fp32":
        raise BenchError("--with-onnxruntime times the CPU in fp32: use --device cpu --dtype fp32")
    if cfg.train_step or cfg.latency:
        raise BenchError("--with-onnxruntime times batched inference only: drop --train-step and --latency "
                         "(for batch-1 latency run --batch-size 1)")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise BenchError("--with-onnxruntime needs the onnx, onnxscript and onnxruntime packages "
                         "(pip install -r requirements.txt)") from None
