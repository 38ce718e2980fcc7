"""Throughput benchmark: how much faster token sharing makes the model (SPEC §8.2).

    python -m segm.bench --backbone vit_small_patch16_384 --crop 512 --decoder mask_transformer \
        --n-cls 150 --batch-size 2 --repeats 10 [--with-random] [--latency] [--train-step] \
        [--json out.json] [--plot sweep.png --sweep 0,0.1,0.2,0.3,0.4,0.5]

All variants share one encoder and decoder and are timed in the same run, interleaved: every
repeat times each variant once on the same batch, starting from a different variant each time,
so load changes on a shared machine hit all of them alike. A fp32 matrix product is timed in
the same rounds as the compute ceiling. The CTS timing includes the policy network (random
weights unless a checkpoint supplies them: the cost does not depend on the weights).

Defaults follow the lab protocol: fp32, eager, no_grad. bf16 (autocast), torch.compile and
timm's fused attention on/off are separately labelled modes. FLOPs come from
`torch.utils.flop_counter` (2 FLOPs per multiply-add; fvcore, used by the lab, counts 1).
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from segm.model import cts
from segm.model.factory import build_net_kwargs, create_segmenter, load_model
from segm.model.segmenter import Segmenter
from segm.utils.atomic import atomic_write, atomic_write_text

DEFAULT_REDUCTION = 0.30
# The reference ADE20K 512 schedule is 612/103 (SPEC §3.8), one more than round(0.3·1024/3).
REFERENCE_SHARED = {1024: 103}
MATMUL_SIZE = 2048


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


@dataclass
class Variant:
    name: str
    policy: str
    num_shared: int
    model: Segmenter
    reduction: float = 0.0
    counts: dict = field(default_factory=dict)  # FLOPs and tokens, from count_flops


# --------------------------------------------------------------------------- settings
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


def check_config(cfg: BenchConfig) -> None:
    """Rejects bad settings before any model is built."""
    for name, low in (("batch_size", 1), ("repeats", 1), ("warmup", 0), ("num_batches", 1), ("matmul_size", 1)):
        if getattr(cfg, name) < low:
            raise BenchError(f"--{name.replace('_', '-')} must be ≥ {low}, got {getattr(cfg, name)}")
    if cfg.dtype not in ("fp32", "bf16"):
        raise BenchError(f"--dtype must be fp32 or bf16, got {cfg.dtype!r}")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise BenchError(f"--device must be cpu or cuda, got {cfg.device!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if cfg.compile and cfg.warmup < 1:
        raise BenchError("--compile needs --warmup ≥ 1 (the first call compiles)")
    if cfg.model_path is None and cfg.backbone is None:
        raise BenchError("give --backbone (a preset) or --model-path (a checkpoint)")
    if cfg.num_shared is not None and cfg.token_reduction is not None:
        raise BenchError("give --num-shared or --token-reduction, not both")
    for rho in cfg.sweep:
        if not 0.0 <= rho <= 0.75:
            raise BenchError(f"--sweep value {rho} must lie in [0, 0.75]")
    parse_inputs(cfg.inputs)


def default_num_shared(grid: tuple[int, int]) -> int:
    n = grid[0] * grid[1]
    return REFERENCE_SHARED.get(n, round(DEFAULT_REDUCTION * n / 3))


# --------------------------------------------------------------------------- models
def _base_model(cfg: BenchConfig) -> tuple[Segmenter, dict]:
    """The model whose encoder and decoder all variants share, and its net_kwargs."""
    if cfg.model_path is not None:
        model, variant = load_model(cfg.model_path)
        return model, variant["net_kwargs"]
    ov = dict(cfg.overrides)
    decoder_layers = ov.pop("decoder_layers", None)
    net = build_net_kwargs(
        cfg.backbone, cfg.decoder, cfg.n_cls, cfg.crop_size, decoder_layers=decoder_layers,
        policy_method="no_sharing", **ov,
    )
    torch.manual_seed(cfg.seed)
    return create_segmenter(net, policy_ckpt_required=False), net


def resolve_budgets(cfg: BenchConfig, grid: tuple[int, int], model_s: int | None = None) -> tuple[int, list]:
    """(S of the main CTS variant, S of the extra sweep points). `model_s`: a CTS checkpoint's S,
    the default when no budget is given."""
    n = grid[0] * grid[1]
    if cfg.num_shared is None and cfg.token_reduction is None:
        s_main = model_s if model_s else default_num_shared(grid)
    else:
        _, s_main = cts.resolve_token_budget(grid, "policy_net", cfg.num_shared, None, cfg.token_reduction)
    if s_main == 0:
        raise BenchError("the CTS budget is S = 0, which is no_sharing itself; give --num-shared ≥ 1")
    cts.resolve_token_budget(grid, "policy_net", s_main)  # range and even-grid checks
    sweep = []
    for rho in cfg.sweep:
        _, s = cts.resolve_token_budget(grid, "policy_net", token_reduction=rho)
        if abs(3 * s / n - 3 * s_main / n) < 0.01:
            s = s_main  # e.g. 30 % at 512: the reference 103 rather than round(102.4)
        if s not in (0, s_main) and s not in sweep:
            sweep.append(s)
    return s_main, sweep


def _preset_grid(cfg: BenchConfig) -> tuple[int, int]:
    from segm.config import load_config

    presets = load_config()["model"]
    if cfg.backbone not in presets:
        raise BenchError(f"unknown backbone {cfg.backbone!r}; choose one of: {', '.join(presets)}")
    p = cfg.overrides.get("patch_size", presets[cfg.backbone]["patch_size"])
    if cfg.crop_size % p:
        raise BenchError(f"crop {cfg.crop_size} is not a multiple of the patch size {p}")
    return cfg.crop_size // p, cfg.crop_size // p


def build_variants(cfg: BenchConfig) -> tuple[list[Variant], dict]:
    """no_sharing, CTS (policy net) at the main budget, optional random policy and sweep points,
    all sharing one encoder and decoder.

    Returns (variants, info) where info records the model and where the policy weights came from.
    """
    if cfg.model_path is None:
        resolve_budgets(cfg, _preset_grid(cfg))  # fail before building anything
    base, net = _base_model(cfg)
    grid = base.grid
    n = grid[0] * grid[1]
    s_main, sweep = resolve_budgets(cfg, grid, base.num_shared if base.policy_method == "policy_net" else None)

    def make(policy: str, s: int) -> Segmenter:
        m = Segmenter(base.encoder, base.decoder, base.n_cls, policy_method=policy, num_shared=s,
                      random_seed=cfg.seed)
        if policy == "policy_net":
            m.policy_net = policy_net  # one shared policy network
        return m

    if base.policy_method == "policy_net":
        policy_net, policy_source = base.policy_net, f"checkpoint {cfg.model_path}"
    else:
        torch.manual_seed(cfg.seed)
        policy_net = Segmenter(base.encoder, base.decoder, base.n_cls, "policy_net", s_main).policy_net
        policy_source = "random weights (timing only: the cost does not depend on the weights)"

    variants = [Variant("no_sharing", "no_sharing", 0, make("no_sharing", 0))]
    variants.append(Variant("cts", "policy_net", s_main, make("policy_net", s_main)))
    if cfg.with_random:
        variants.append(Variant("random", "random", s_main, make("random", s_main)))
    for s in sweep:
        variants.append(Variant(f"cts_{3 * s / n:.2f}", "policy_net", s, make("policy_net", s)))
    for v in variants:
        v.reduction = 3 * v.num_shared / n
        v.model.eval()
    info = {
        "backbone": net.get("backbone"), "decoder": net["decoder"]["name"] if isinstance(net["decoder"], dict)
        else net["decoder"], "n_cls": base.n_cls, "crop_size": list(base.crop_size),
        "patch_size": base.patch_size, "grid": list(grid), "num_patches": n,
        "d_model": net.get("d_model"), "n_layers": net.get("n_layers"), "n_heads": net.get("n_heads"),
        "normalization": net.get("normalization", "vit"), "policy_weights": policy_source,
        "model_path": cfg.model_path,
    }
    return variants, info


def set_fused_attention(model: torch.nn.Module, enabled: bool) -> list:
    """Switches timm's fused attention (F.scaled_dot_product_attention) on every Attention
    module; returns the previous values for `restore_fused_attention`."""
    mods = [m for m in model.modules() if hasattr(m, "fused_attn")]
    old = [m.fused_attn for m in mods]
    for m in mods:
        m.fused_attn = enabled
    return list(zip(mods, old))


def restore_fused_attention(saved: list) -> None:
    """Undoes `set_fused_attention`."""
    for m, v in saved:
        m.fused_attn = v


# --------------------------------------------------------------------------- inputs
def make_batches(cfg: BenchConfig, crop: tuple[int, int], normalization: str, device) -> list[torch.Tensor]:
    """`num_batches` batches of distinct images (unless `same_image`), on the device."""
    b, nb = cfg.batch_size, cfg.num_batches
    per_batch = 1 if cfg.same_image else b
    spec = parse_inputs(cfg.inputs)
    if spec is None:
        g = torch.Generator().manual_seed(cfg.seed)
        ims = torch.rand(nb * per_batch, 3, *crop, generator=g) * 2 - 1  # normalised range
    else:
        ims = load_images(spec[0], spec[1], nb * per_batch, crop, normalization, cfg.data_root)
    ims = ims.view(nb, per_batch, 3, *crop)
    if cfg.same_image:
        ims = ims.expand(nb, b, 3, *crop)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return [x.to(device).contiguous(memory_format=fmt) for x in ims]


def load_images(name: str, split: str, count: int, crop: tuple[int, int], normalization: str,
                data_root=None) -> torch.Tensor:
    """`count` validation images through the dataset's test pipeline (normalised), resized to
    crop×crop (bilinear, aspect ignored, as the lab protocol). Images are spread evenly over
    the split; a split smaller than `count` is cycled."""
    from segm.data import build_dataset

    try:
        ds = build_dataset(name, split, im_size=crop[0], crop_size=crop[0], normalization=normalization,
                           data_root=data_root)
    except RuntimeError as e:  # e.g. $DATASET unset
        raise BenchError(f"--inputs {name}:{split}: {e}") from None
    idx = [(i * len(ds)) // count for i in range(count)] if count <= len(ds) else [i % len(ds) for i in range(count)]
    out = torch.empty(count, 3, *crop)
    for j, i in enumerate(idx):
        im = ds[i]["im"][0].unsqueeze(0).float()
        out[j] = F.interpolate(im, size=crop, mode="bilinear", align_corners=False)[0]
    return out


# --------------------------------------------------------------------------- measurement helpers
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(cfg: BenchConfig):
    if cfg.dtype == "bf16":
        return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def round_robin(fns: dict[str, Callable], inputs: list, warmup: int, repeats: int, device,
                log: Callable = lambda s: None, phase: str = "") -> dict[str, list[float]]:
    """Seconds per call: each repeat calls every fn once on the same input, starting from a
    different fn each repeat (so no fn always runs first or right after another)."""
    names = list(fns)
    for r in range(warmup):
        for name in names:
            fns[name](inputs[r % len(inputs)])
        log(f"[{phase}] warm-up {r + 1}/{warmup}")
    times = {name: [] for name in names}
    for r in range(repeats):
        x = inputs[r % len(inputs)]
        k = r % len(names)
        for name in names[k:] + names[:k]:
            _sync(device)
            t0 = time.perf_counter()
            fns[name](x)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        log(f"[{phase}] repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    return times


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _rate(times: list[float], per_call: float) -> dict:
    """per_call / time → {median, min, max} (min rate from the slowest call)."""
    return {"median": per_call / statistics.median(times), "min": per_call / max(times),
            "max": per_call / min(times)}


def _paired_speedup(base: list[float], other: list[float]) -> float:
    """Median over repeats of base/other, each pair timed in the same round."""
    return statistics.median(b / o for b, o in zip(base, other))


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage created while active (the CPU analogue of CUDA's
    max_memory_allocated above the starting level). Storages are tracked from the op outputs
    that create them until they die; memory an op uses only internally is not seen."""

    def __init__(self):
        super().__init__()
        self.live: dict = {}
        self.current = self.peak = 0

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[int, int]:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        # Views and in-place results share an input's storage (e.g. a weight's): not new memory.
        inputs = {self._key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = self._key(t)
                if key[1] and key not in self.live and key not in inputs:
                    self.live[key] = (StorageWeakRef(st), key[1])
                    self.current += key[1]
        self.peak = max(self.peak, self.current)
        return out


def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Resets the kernel's RSS high-water mark (VmHWM); Linux only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak_memory(fn: Callable, x, device) -> dict:
    """Peak memory of one call, in MiB, above the level just before it (`delta_mib`).

    CUDA: max_memory_allocated. CPU: tensor storage tracked by `PeakTensorMemory`, plus the
    process RSS high-water-mark growth (`rss_delta_mib`: VmHWM reset through
    /proc/self/clear_refs, else ru_maxrss, which never resets), which misses memory the
    allocator reuses and counts what it caches, so it is only a rough cross-check.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn(x)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"delta_mib": (peak - before) / 2**20, "peak_mib": peak / 2**20,
                "method": "cuda max_memory_allocated"}
    if _reset_rss_peak():
        rss_before = _rss_kib("VmRSS")
        rss = lambda: _rss_kib("VmHWM")  # noqa: E731
    else:
        import resource

        rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
        rss_before = rss()
    with PeakTensorMemory() as tracker:
        fn(x)
    return {"delta_mib": tracker.peak / 2**20, "rss_delta_mib": (rss() - rss_before) / 1024,
            "method": "tensor storage created during the call (dispatch-mode tracker)"}


def count_flops(variant: Variant, x: torch.Tensor) -> dict:
    """Forward FLOPs per image (and of the policy net alone) on eager fp32, and the token count.

    Attention is counted with timm's explicit path: the flop counter does not see the fused CPU
    kernel, and both compute the same products."""
    model = variant.model
    saved = set_fused_attention(model, False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            out = model.forward_all(x)
        total = fc.get_total_flops()
        policy = 0
        if variant.policy == "policy_net":
            with torch.no_grad(), FlopCounterMode(display=False) as fp:
                model.policy_net(x)
            policy = fp.get_total_flops()
    finally:
        restore_fused_attention(saved)
    b = x.shape[0]
    prefix = model.encoder.num_prefix_tokens
    return {"gflops": total / b / 1e9, "policy_gflops": policy / b / 1e9,
            "tokens": out.layout.num_tokens + prefix, "patch_tokens": out.layout.num_tokens,
            "prefix_tokens": prefix}


def count_train_flops(model: Segmenter, x: torch.Tensor, labels: torch.Tensor) -> float:
    saved = set_fused_attention(model, False)
    try:
        with FlopCounterMode(display=False) as fc:
            F.cross_entropy(model(x), labels, ignore_index=255).backward()
    finally:
        restore_fused_attention(saved)
        model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / x.shape[0] / 1e9


def machine_info(device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import timm

    info = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "gpu": None,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# --------------------------------------------------------------------------- the benchmark
def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Builds the variants, measures them and returns the results (see `format_table`)."""
    check_config(cfg)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _speedups(ref: list[float], t: list[float]) -> dict:
    return {"speedup": statistics.median(ref) / statistics.median(t),
            "speedup_paired": _paired_speedup(ref, t), "speedup_best": min(ref) / min(t)}


def _memory(cfg: BenchConfig, compiled_fn: Callable, eager_fn: Callable, x, device) -> dict:
    # The CPU tracker sees eager ops only: compiled variants are measured eager there.
    eager = cfg.compile and device.type == "cpu"
    mem = measure_peak_memory(eager_fn if eager else compiled_fn, x, device)
    return {**mem, "eager": eager or not cfg.compile}


def _run(cfg: BenchConfig, log: Callable[[str], None]) -> dict:
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    load_before = _loadavg()
    variants, model_info = build_variants(cfg)
    base = variants[0].model
    for v in variants:
        v.model.to(device)
        if cfg.channels_last:
            v.model.to(memory_format=torch.channels_last)
    set_fused_attention(base, cfg.sdpa)  # encoder and decoder are shared by all variants
    batches = make_batches(cfg, base.crop_size, model_info["normalization"], device)
    log(f"{len(variants)} variants: " + ", ".join(f"{v.name} (S={v.num_shared})" for v in variants))

    for v in variants:  # one counted eager fp32 forward per variant, batch 1
        v.counts = count_flops(v, batches[0][:1])
    runners = {v.name: (torch.compile(v.model) if cfg.compile else v.model) for v in variants}
    results, matmul = inference_phase(cfg, variants, runners, batches, device, log)
    for v, r in zip(variants, results):
        r["num_notshared"] = model_info["num_patches"] - 4 * v.num_shared
    if cfg.train_step:
        train = train_phase(cfg, variants, runners, batches, device, log)
        for r in results:
            r["train"] = train[r["name"]]

    notes = [
        "CTS timings include the policy network; random-policy timings do not need one.",
        f"policy network weights: {model_info['policy_weights']}",
        "GFLOPs: torch.utils.flop_counter, 2 FLOPs per multiply-add (fvcore/lab numbers are half); "
        "attention counted via timm's explicit path.",
        "speed-up = median(no_sharing time)/median(variant time); paired = median over repeats of "
        "the same-round ratio (robust to load drift); best = fastest/fastest (robust to bursts).",
    ]
    if device.type == "cpu":
        notes.append("CPU peak memory: tensor storage allocated during one call (as CUDA's "
                     "max_memory_allocated), the output included; weights and inputs excluded.")
    return {
        "config": {**asdict(cfg), "sweep": list(cfg.sweep)},
        "model": model_info,
        "machine": machine_info(device),
        "load_average": {"before": load_before, "after": _loadavg()},
        "protocol": {
            "batch_size": cfg.batch_size, "warmup": cfg.warmup, "repeats": cfg.repeats, "dtype": cfg.dtype,
            "autocast": cfg.dtype == "bf16", "compile": cfg.compile, "fused_attention": cfg.sdpa,
            "channels_last": cfg.channels_last, "inputs": cfg.inputs, "same_image": cfg.same_image,
            "num_batches": cfg.num_batches, "interleaved": True, "policy_net_included": True,
            "grad": "no_grad (inference)",
        },
        "matmul": matmul,
        "variants": results,
        "notes": notes,
    }


def inference_phase(cfg: BenchConfig, variants: list[Variant], runners: dict, batches: list, device,
                    log: Callable) -> tuple[list[dict], dict]:
    """Throughput (and optionally batch-1 latency and peak memory) per variant, with the fp32
    reference matmul timed in the same rounds. Returns (per-variant results, matmul result)."""
    def infer(m):
        def fn(x):
            with torch.no_grad(), _autocast(cfg):
                m(x)
        return fn

    n_mm = cfg.matmul_size
    a = torch.randn(n_mm, n_mm, device=device)
    bm = torch.randn(n_mm, n_mm, device=device)
    mm_iters = 20 if device.type == "cuda" else 1

    def matmul(_):
        for _ in range(mm_iters):
            torch.mm(a, bm)

    fns = {v.name: infer(runners[v.name]) for v in variants}
    times = round_robin({**fns, "matmul": matmul}, batches, cfg.warmup, cfg.repeats, device, log, "inference")
    matmul_res = {"size": n_mm, "dtype": "fp32", "iters_per_call": mm_iters,
                  "gflop_per_s": _rate(times.pop("matmul"), 2 * n_mm**3 * mm_iters / 1e9)}
    mm_rate = matmul_res["gflop_per_s"]["median"]

    results = []
    for v in variants:
        t = times[v.name]
        img_s = _rate(t, cfg.batch_size)
        achieved = v.counts["gflops"] * img_s["median"]
        results.append({
            "name": v.name, "policy": v.policy, "num_shared": v.num_shared, "reduction": v.reduction,
            **v.counts,
            "inference": {"times_s": t, "img_s": img_s, **_speedups(times["no_sharing"], t),
                          "gflop_per_s": achieved, "matmul_fraction": achieved / mm_rate},
        })

    if cfg.latency:
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        singles = [x[:1].contiguous(memory_format=fmt) for x in batches]
        lat = round_robin(fns, singles, cfg.warmup, cfg.repeats, device, log, "latency b1")
        for r in results:
            t = lat[r["name"]]
            r["latency_b1"] = {"times_s": t, "ms": {k: 1e3 * s for k, s in summary(t).items()},
                               "speedup": statistics.median(lat["no_sharing"]) / statistics.median(t)}
    if cfg.memory:
        for v, r in zip(variants, results):
            r["inference"]["memory"] = _memory(cfg, fns[v.name], infer(v.model), batches[0], device)
    return results, matmul_res


def train_phase(cfg: BenchConfig, variants: list[Variant], runners: dict, batches: list, device,
                log: Callable) -> dict:
    """Training step per variant: forward + CE loss on random labels + backward + SGD step.

    One optimizer over the shared encoder/decoder; the policy network stays frozen (eval mode)."""
    base = variants[0].model
    params = [p for p in base.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    crop = base.crop_size
    labels = [torch.randint(0, base.n_cls, (cfg.batch_size, *crop), generator=g).to(device) for _ in batches]
    pairs = list(zip(batches, labels))

    def step(m):
        def fn(xy):
            x, y = xy
            with _autocast(cfg):
                loss = F.cross_entropy(m(x), y, ignore_index=255)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return fn

    for v in variants:
        v.model.train()
    train_flops = {v.name: count_train_flops(v.model, batches[0][:1], labels[0][:1]) for v in variants}
    fns = {v.name: step(runners[v.name]) for v in variants}
    times = round_robin(fns, pairs, cfg.warmup, cfg.repeats, device, log, "train step")
    out = {}
    ref = times["no_sharing"]
    for v in variants:
        t = times[v.name]
        img_s = _rate(t, cfg.batch_size)
        out[v.name] = {"times_s": t, "img_s": img_s, "gflops": train_flops[v.name],
                       "gflop_per_s": train_flops[v.name] * img_s["median"], **_speedups(ref, t)}
        if cfg.memory:
            out[v.name]["memory"] = _memory(cfg, fns[v.name], step(v.model), pairs[0], device)
    for v in variants:
        v.model.eval()
    return out


# --------------------------------------------------------------------------- reporting
def format_table(result: dict) -> str:
    """A markdown table, one row per variant."""
    p, mm = result["protocol"], result["matmul"]["gflop_per_s"]["median"]
    has_lat = any("latency_b1" in r for r in result["variants"])
    has_train = any("train" in r for r in result["variants"])
    has_mem = any("memory" in r["inference"] for r in result["variants"])
    head = ["variant", "S", "tokens", "reduction", "GFLOPs/img", "img/s median [min–max]", "speed-up",
            "paired", "best", "GFLOP/s (% mm)"]
    if has_lat:
        head += ["b1 latency ms", "b1 speed-up"]
    if has_mem:
        head += ["peak mem Δ MiB"]
    if has_train:
        head += ["train img/s [min–max]", "train speed-up"] + (["train mem Δ MiB"] if has_mem else [])
    rows = []
    for r in result["variants"]:
        inf = r["inference"]
        i = inf["img_s"]
        row = [r["name"], str(r["num_shared"]), str(r["tokens"]), f"{100 * r['reduction']:.1f} %",
               f"{r['gflops']:.3g}", f"{i['median']:.3g} [{i['min']:.3g}–{i['max']:.3g}]",
               f"{inf['speedup']:.2f}×", f"{inf['speedup_paired']:.2f}×", f"{inf['speedup_best']:.2f}×",
               f"{inf['gflop_per_s']:.1f} ({100 * inf['matmul_fraction']:.0f} %)"]
        if has_lat:
            lat = r["latency_b1"]
            row += [f"{lat['ms']['median']:.1f}", f"{lat['speedup']:.2f}×"]
        if has_mem:
            row += [f"{inf['memory']['delta_mib']:.0f}"]
        if has_train:
            t = r["train"]
            row += [f"{t['img_s']['median']:.3g} [{t['img_s']['min']:.3g}–{t['img_s']['max']:.3g}]",
                    f"{t['speedup']:.2f}×"] + ([f"{t['memory']['delta_mib']:.0f}"] if has_mem else [])
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    m, mach = result["model"], result["machine"]
    load = result["load_average"]
    dev = mach["gpu"] or f"{mach['cpu']} ({mach['torch_threads']} threads)"
    lines += [
        "",
        f"{m['backbone']} + {m['decoder']}, {m['n_cls']} classes, crop {m['crop_size'][0]}×{m['crop_size'][1]}, "
        f"batch {p['batch_size']}, {p['dtype']}{' autocast' if p['autocast'] else ''}, "
        f"{'compiled' if p['compile'] else 'eager'}, fused attention {'on' if p['fused_attention'] else 'off'}"
        f"{', channels_last' if p['channels_last'] else ''}, inputs {p['inputs']}"
        f"{' (one image per batch)' if p['same_image'] else ''}; warm-up {p['warmup']}, {p['repeats']} "
        f"interleaved repeats on {dev}.",
        f"fp32 {result['matmul']['size']}² matmul: {mm:.1f} GFLOP/s (median). Load average before/after: "
        f"{_fmt_load(load['before'])} / {_fmt_load(load['after'])}.",
    ]
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines)


def _fmt_load(load) -> str:
    return "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)


def write_json(result: dict, path) -> None:
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")


def plot_sweep(result: dict, path) -> None:
    """Images/s (median, min–max bars) against token reduction, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = [("inference", "policy_net", "CTS (policy net)", "o-")]
    if any(r["policy"] == "random" for r in result["variants"]):
        series.append(("inference", "random", "random policy", "s"))
    if any("train" in r for r in result["variants"]):
        series.append(("train", "policy_net", "CTS train step", "^--"))
    base = result["variants"][0]
    for phase, policy, label, style in series:
        rows = [base] + [r for r in result["variants"] if r["policy"] == policy]
        if policy == "random":
            rows = rows[1:]
        rows.sort(key=lambda r: r["reduction"])
        key = "inference" if phase == "inference" else "train"
        x = [100 * r["reduction"] for r in rows]
        y = [r[key]["img_s"]["median"] for r in rows]
        err = [[yy - r[key]["img_s"]["min"] for yy, r in zip(y, rows)],
               [r[key]["img_s"]["max"] - yy for yy, r in zip(y, rows)]]
        ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=label)
    m, p = result["model"], result["protocol"]
    ax.set_xlabel("token reduction 3S/N (%)")
    ax.set_ylabel("images / s")
    ax.set_title(f"{m['backbone']}, {m['crop_size'][0]} px, batch {p['batch_size']}, {p['dtype']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=120, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- CLI
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


def _cli():
    import click

    @click.command(context_settings={"show_default": True})
    @click.option("--backbone", default="vit_small_patch16_384", help="Backbone preset (configs/config.yml).")
    @click.option("--decoder", default="mask_transformer", type=click.Choice(["mask_transformer", "linear"]))
    @click.option("--n-cls", default=150, type=int)
    @click.option("--crop", "crop_size", default=512, type=int, help="Crop (input) size in pixels.")
    @click.option("--model-path", type=click.Path(), help="Benchmark a checkpoint instead of a preset.")
    @click.option("--d-model", type=int, help="Override the preset width.")
    @click.option("--n-heads", type=int, help="Override the preset head count.")
    @click.option("--n-layers", type=int, help="Override the preset depth.")
    @click.option("--decoder-layers", type=int, help="Mask-transformer layers (preset: 2).")
    @click.option("--num-shared", "--num-tokens-shared", "num_shared", type=int, help="CTS budget S (default: the reference 30 %, S=103 at 512).")
    @click.option("--token-reduction", type=float, help="CTS budget as reduction ρ: S = round(ρN/3).")
    @click.option("--with-random", is_flag=True, help="Also time the random policy on the same budget.")
    @click.option("--sweep", help="Comma-separated reductions to time too, e.g. 0,0.1,0.2,0.3,0.4,0.5.")
    @click.option("--batch-size", default=2, type=int)
    @click.option("--warmup", default=2, type=int, help="Untimed interleaved rounds.")
    @click.option("--repeats", default=10, type=int, help="Timed interleaved rounds.")
    @click.option("--device", default="cpu", help="cpu or cuda.")
    @click.option("--dtype", default="fp32", type=click.Choice(["fp32", "bf16"]), help="bf16 = autocast.")
    @click.option("--compile/--no-compile", default=False, help="torch.compile every variant.")
    @click.option("--sdpa/--no-sdpa", default=True, help="timm fused attention on/off.")
    @click.option("--channels-last", is_flag=True, help="channels_last inputs and conv weights.")
    @click.option("--threads", type=int, help="torch.set_num_threads.")
    @click.option("--inputs", default="random", help="random, or DATASET[:SPLIT] validation images (e.g. ade20k:val).")
    @click.option("--data-root", type=click.Path(), help="The dataset's folder (default $DATASET/<name>).")
    @click.option("--num-batches", default=4, type=int, help="Distinct input batches, cycled over repeats.")
    @click.option("--same-image", is_flag=True, help="Lab protocol: each batch is one image repeated.")
    @click.option("--latency", is_flag=True, help="Also time batch 1.")
    @click.option("--train-step", is_flag=True, help="Also time a training step (policy frozen).")
    @click.option("--memory/--no-memory", default=True, help="Measure peak memory per variant.")
    @click.option("--matmul-size", default=MATMUL_SIZE, type=int, help="Side of the fp32 reference matmul.")
    @click.option("--seed", default=0, type=int)
    @click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results as JSON.")
    @click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Plot images/s against reduction.")
    @click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
    def main(d_model, n_heads, n_layers, decoder_layers, sweep, json_path, plot_path, quiet, **kw):
        """Time no_sharing against CTS (and optionally the random policy) in one interleaved run."""
        overrides = {k: v for k, v in dict(d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                                           decoder_layers=decoder_layers).items() if v is not None}
        try:
            _check_output(json_path, "--json")
            _check_output(plot_path, "--plot")
            cfg = BenchConfig(overrides=overrides, sweep=_parse_sweep(sweep), **kw)
            if kw["model_path"] is not None:
                cfg.backbone = None
            log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
            result = run_benchmark(cfg, log=log)
            if json_path:
                write_json(result, json_path)
            if plot_path:
                plot_sweep(result, plot_path)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise click.ClickException(str(e)) from None
        click.echo(format_table(result))

    return main


main = _cli()

if __name__ == "__main__":
    main()
