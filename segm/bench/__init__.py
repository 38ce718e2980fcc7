"""Throughput benchmark: how much faster token sharing makes the model.

    python -m segm.bench --backbone vit_small_patch16_384 --crop 512 --decoder mask_transformer \
        --n-cls 150 --batch-size 2 --repeats 10 [--with-random] [--latency] [--train-step] \
        [--reducer NAME[:KEY=VALUE,...]] [--json out.json] [--plot sweep.png --sweep 0,0.1,0.2,0.3,0.4,0.5]

Each variant is one token reducer (`segm.model.reduction`): none (`no_sharing`), CTS with its
scorers and budgets, and any reducer registered with `register_reducer` (`--reducer`). Token
counts come from the forward's token map, the reduction is 1 − T/N, and every row records the
reducer's `describe()`.

All variants share one encoder and decoder and are timed in the same run, interleaved: every
repeat times each variant once on the same batch, starting from a different variant each time,
so load changes on a shared machine hit all of them alike. A fp32 matrix product is timed in
the same rounds as the compute ceiling. The CTS timing includes the policy network (random
weights unless a checkpoint supplies them: the cost does not depend on the weights).

Defaults follow the lab protocol: fp32, eager, no_grad. bf16 (autocast), torch.compile and
timm's fused attention on/off are separately labelled modes. FLOPs come from
`torch.utils.flop_counter` (2 FLOPs per multiply-add; fvcore, used by the lab, counts 1).

Modules: `settings` (BenchConfig, its checks and the variant names), `budgets` (the S values
timed), `variants` (the shared-weight models, one reducer each), `inputs`, `timing`, `memory`,
`flops`, `machine`, `phases` (inference and training step), `run` (run_benchmark), `report`
(table, JSON, plot), `cli`, `onnx` (`--with-onnxruntime`: each variant exported and timed in ONNX Runtime beside eager).
"""
from segm.bench.budgets import default_num_shared, resolve_budgets
from segm.bench.cli import main
from segm.bench.flops import count_flops, count_train_flops
from segm.bench.inputs import load_images, make_batches
from segm.bench.machine import machine_info
from segm.bench.memory import PeakTensorMemory, measure_peak_memory
from segm.bench.phases import inference_phase, train_phase
from segm.bench.report import format_table, plot_sweep, write_json
from segm.bench.run import run_benchmark
from segm.bench.settings import MATMUL_SIZE, BenchConfig, BenchError, check_config, parse_inputs
from segm.bench.timing import round_robin, summary
from segm.bench.variants import Variant, build_variants, restore_fused_attention, set_fused_attention

__all__ = [
    "MATMUL_SIZE", "BenchConfig", "BenchError", "PeakTensorMemory",
    "Variant", "build_variants", "check_config", "count_flops", "count_train_flops", "default_num_shared",
    "format_table", "inference_phase", "load_images", "machine_info", "main", "make_batches",
    "measure_peak_memory", "parse_inputs", "plot_sweep", "resolve_budgets", "restore_fused_attention",
    "round_robin", "run_benchmark", "set_fused_attention", "summary", "train_phase", "write_json",
]
