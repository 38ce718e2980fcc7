"""The benchmark's outputs: the markdown table, the JSON file and the sweep plot."""
from __future__ import annotations

import json
from pathlib import Path

from segm.utils.atomic import atomic_write, atomic_write_text


def _columns(result: dict) -> tuple[bool, bool, bool]:
    """Which optional measurements the result holds: (latency, memory, train)."""
    rows = result["variants"]
    return (any("latency_b1" in r for r in rows), any("memory" in r["inference"] for r in rows),
            any("train" in r for r in rows))


def _head(has_lat: bool, has_mem: bool, has_train: bool) -> list[str]:
    head = ["variant", "S", "tokens", "reduction", "GFLOPs/img", "img/s median [min–max]", "speed-up",
            "paired", "best", "GFLOP/s (% mm)"]
    if has_lat:
        head += ["b1 latency ms", "b1 speed-up"]
    if has_mem:
        head += ["peak mem Δ MiB"]
    if has_train:
        head += ["train img/s [min–max]", "train speed-up"] + (["train mem Δ MiB"] if has_mem else [])
    return head


def _row(r: dict, has_lat: bool, has_mem: bool, has_train: bool) -> list[str]:
    inf = r["inference"]
    i = inf["img_s"]
    stages = f" ({'→'.join(map(str, r['stage_tokens']))})" if r.get("stage_tokens") else ""
    row = [r["name"], _budget(r), f"{r['tokens']}{stages}", f"{100 * r['reduction']:.1f} %",
           f"{r['gflops']:.3g}", f"{i['median']:.3g} [{i['min']:.3g}–{i['max']:.3g}]",
           f"{inf['speedup']:.2f}×", f"{inf['speedup_paired']:.2f}×", f"{inf['speedup_best']:.2f}×",
           f"{inf['gflop_per_s']:.1f} ({100 * inf['matmul_fraction']:.0f} %)"]
    if has_lat:
        lat = r["latency_b1"]
        row += [f"{lat['ms']['median']:.1f}", f"{lat['speedup']:.2f}×"]
    if has_mem:
        row += [f"{inf['memory']['delta_mib']:.0f}" if "memory" in inf else "n/a"]
    if has_train:
        t = r["train"]
        row += [f"{t['img_s']['median']:.3g} [{t['img_s']['min']:.3g}–{t['img_s']['max']:.3g}]",
                f"{t['speedup']:.2f}×"] + ([f"{t['memory']['delta_mib']:.0f}"] if has_mem else [])
    return row


def _budget(r: dict) -> str:
    """The S column: CTS's budget, 0 without reduction, "–" for a reducer that has none."""
    if "num_shared" in r.get("reducer", {"num_shared": None}) or not r["reduction"]:
        return str(r["num_shared"])
    return "–"


def _footer(result: dict) -> list[str]:
    """The setting the table was measured in, then the notes."""
    p, mm = result["protocol"], result["matmul"]["gflop_per_s"]["median"]
    m, mach = result["model"], result["machine"]
    load = result["load_average"]
    dev = mach["gpu"] or f"{_cpu_name(mach)} ({mach['torch_threads']} threads)"
    lines = [
        "",
        f"{m['backbone']} + {m['decoder']}, {m['n_cls']} classes, crop {m['crop_size'][0]}×{m['crop_size'][1]}, "
        f"batch {p['batch_size']}, {p['dtype']}{' autocast' if p['autocast'] else ''}, "
        f"{'compiled' if p['compile'] else 'eager'}, fused attention {'on' if p['fused_attention'] else 'off'}"
        f"{', channels_last' if p['channels_last'] else ''}, inputs {p['inputs']}"
        f"{' (one image per batch)' if p['same_image'] else ''}"
        f"{', freed memory kept (--reuse-memory)' if p.get('reuse_memory') else ''}"
        f"{', output labels (no full-resolution logits)' if p.get('output') == 'labels' else ''}; "
        f"warm-up {p['warmup']}, "
        f"{p['repeats']} interleaved repeats on {dev}.",
        f"fp32 {result['matmul']['size']}² matmul: {mm:.1f} GFLOP/s (median). Load average before/after: "
        f"{_fmt_load(load['before'])} / {_fmt_load(load['after'])}.",
    ]
    if result.get("policy_net"):
        lines.append(_policy_line(result["policy_net"], on_gpu=bool(mach["gpu"])))
    return lines + [f"- {n}" for n in result["notes"]]


def _cpu_name(mach: dict) -> str:
    """e.g. "AMD EPYC, family 26 model 2, AVX512": the model name alone does not tell CPU generations apart."""
    parts = [mach["cpu"]]
    if mach.get("cpu_family"):
        parts.append(f"family {mach['cpu_family']} model {mach['cpu_model']}")
    if mach.get("cpu_capability"):
        parts.append(mach["cpu_capability"])
    return ", ".join(parts)


def _policy_line(policy: dict, on_gpu: bool) -> str:
    """The CTS variant's policy network alone, timed in the same rounds."""
    fused = policy["onednn"]
    if on_gpu:
        path = "on the GPU the plain convolutions run"
    elif not fused["layers"]:
        path = "no folded convs"
    elif fused["available"]:
        path = f"oneDNN fused conv path taken in {fused['taken']} of {fused['layers']} convs"
    else:
        path = "this torch has no oneDNN fused conv: conv, then activation"
    return (f"Policy network alone (eager, BatchNorm folded): {policy['ms_per_batch']:.1f} ms per batch, "
            f"{policy['ms_per_image']:.1f} ms per image, {100 * policy['share_of_cts']:.0f} % of the CTS "
            f"forward; {path}.")


def format_table(result: dict) -> str:
    """A markdown table, one row per variant."""
    cols = _columns(result)
    head = _head(*cols)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_row(r, *cols)) + " |" for r in result["variants"]]
    return "\n".join(lines + _footer(result))


def _fmt_load(load) -> str:
    return "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)


def write_json(result: dict, path) -> None:
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")


_MARKERS = ("s", "D", "v", "P", "X", "*", "<", ">")


def _sweep_series(result: dict) -> list[tuple[str, list[dict], str, str]]:
    """(phase, rows, label, line style) of each plotted line. The first series (the main CTS
    variant and the sweep's budgets) is a line from the unreduced model; each other series
    (another scorer or reducer) is drawn as points. Eager rows only."""
    base, *rows = result["variants"]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("backend", "eager") == "eager":
            groups.setdefault(r.get("series") or r["name"], []).append(r)
    series = []
    for k, (label, group) in enumerate(groups.items()):
        if k == 0:
            series.append(("inference", [base] + group, label, "o-"))
            if any("train" in r for r in result["variants"]):
                series.append(("train", [base] + group, f"{label} train step", "^--"))
        else:
            series.append(("inference", group, label, _MARKERS[(k - 1) % len(_MARKERS)]))
    return series


def plot_sweep(result: dict, path) -> None:
    """Images/s (median, min–max bars) against token reduction, one line per reducer (CTS: per scorer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for phase, rows, label, style in _sweep_series(result):
        rows = sorted(rows, key=lambda r: r["reduction"])
        x = [100 * r["reduction"] for r in rows]
        y = [r[phase]["img_s"]["median"] for r in rows]
        err = [[yy - r[phase]["img_s"]["min"] for yy, r in zip(y, rows)],
               [r[phase]["img_s"]["max"] - yy for yy, r in zip(y, rows)]]
        ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=label)
    m, p = result["model"], result["protocol"]
    ax.set_xlabel("token reduction 1 − T/N (%)")
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
