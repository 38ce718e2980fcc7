"""`make demo`: the whole CTS pipeline on generated data, on the CPU, with no network.

Generates the synthetic dataset, trains the policy network, trains Segmenter (ViT-Tiny) with
CTS, without sharing and with the random policy on the same token budget, evaluates the three,
benchmarks them, writes inference overlays and sharing maps, and prints a table. Every step is
the real command line a researcher would run, so the demo is also an end-to-end check.

    python scripts/demo.py [--out demo_out] [--quick]

Re-running reuses finished steps (the dataset, the policy, finished runs); --fresh starts over.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

PY = sys.executable
BACKBONE = "vit_tiny_patch16_384"


def run(args: list[str], log: Path) -> None:
    """Runs one command, echoing it; its output goes to `log` (and the tail to the console on failure)."""
    print(f"$ {' '.join(str(a) for a in args)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([str(a) for a in args], stdout=f, stderr=subprocess.STDOUT, env=os.environ)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-25:]
        print("\n".join(tail))
        raise SystemExit(f"demo step failed (exit {proc.returncode}); full log: {log}")
    print(f"  done in {time.perf_counter() - t0:.0f} s (log: {log})", flush=True)


@click.command()
@click.option("--out", default="demo_out", type=click.Path(file_okay=False), show_default=True)
@click.option("--quick", is_flag=True, help="A much shorter run (smoke test; figures not meaningful).")
@click.option("--fresh", is_flag=True, help="Delete --out first.")
def main(out, quick, fresh):
    out = Path(out).resolve()
    if fresh and out.exists():
        shutil.rmtree(out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()

    n_train, n_val = (40, 12) if quick else (400, 100)
    policy_iters = 20 if quick else 500
    seg_iters = 20 if quick else 600
    crop = 128  # windows of 128 px on images of 256 px (configs/config.yml: synthetic)
    # N = 64 patches, 16 superpatches per window. S = 4 shared (U = 48, T = 52, 19 % fewer tokens);
    # the paper's 30 % budget (S = 6) has not been re-measured since the policy-backbone fix
    # (BENCHMARKS.md, "demo").
    s = 4
    data_root = out / "datasets" / "synthetic"

    print(f"== 1. synthetic dataset ({n_train} train / {n_val} val)")
    run([PY, "-m", "segm.scripts.prepare_synthetic", out / "datasets", "--num-train", n_train,
         "--num-val", n_val, "--size", 256, "--seed", 0], logs / "prepare.log")

    print(f"== 2. policy network ({policy_iters} iterations)")
    policy = out / "policynet" / "synthetic" / "model.pth"
    if not policy.is_file():
        run([PY, "-m", "policynet.train", "--dataset", "synthetic", "--data-root", data_root,
             "--exp_name", "synthetic", "--logdir", out / "policynet", "--backbone", "tf_efficientnet_lite0",
             "--pretrained", "lite0", "--num_iterations", policy_iters, "--eval_iterations", policy_iters,
             "--batch_size_train", 8, "--num-workers", 2, "--device", "cpu", "--num-shared", s,
             # the reference lr 5e-5 is tuned for 50 000 iterations; 500 need a larger step
             "--lr", "2e-4",
             "--no-progress"], logs / "policynet.log")

    runs = {
        "no_sharing": ["--policy-method", "no_sharing"],
        "cts": ["--policy-method", "policy_net", "--num-tokens-shared", s, "--policynet-ckpt", policy],
        "random": ["--policy-method", "random", "--num-tokens-shared", s],
    }
    for name, args in runs.items():
        print(f"== 3. Segmenter {BACKBONE} [{name}] ({seg_iters} iterations)")
        run([PY, "-m", "segm.train", "--log-dir", out / "runs" / name, "--dataset", "synthetic",
             "--data-root", data_root, "--backbone", BACKBONE, "--pretrained", "none",
             "--decoder", "mask_transformer", "--iterations", seg_iters, "--batch-size", 8,
             "-lr", "1e-3", "--eval-freq", 0, "--num-workers", 2, "--device", "cpu", "--seed", 0,
             *args], logs / f"train_{name}.log")

    scores = {}
    for name in runs:
        print(f"== 4. evaluate [{name}]")
        ckpt = out / "runs" / name / "checkpoint.pth"
        run([PY, "-m", "segm.eval.miou", ckpt, "synthetic", "--data-root", data_root, "--singlescale",
             "--device", "cpu"], logs / f"eval_{name}.log")
        from segm.config import load_yaml

        scores[name] = load_yaml(ckpt.parent / "scores_ss.yml")

    print("== 5. benchmark (no_sharing vs CTS vs random, interleaved, validation images)")
    bench_json = out / "bench.json"
    run([PY, "-m", "segm.bench", "--model-path", out / "runs" / "cts" / "checkpoint.pth",
         "--with-random", "--inputs", "synthetic:val", "--data-root", data_root, "--batch-size", 8,
         "--warmup", 2, "--repeats", 3 if quick else 10, "--json", bench_json, "--quiet"],
        logs / "bench.log")
    bench = json.loads(bench_json.read_text())
    print("== 5b. where CTS pays: ViT-S/16 at 512 (150 classes, batch 2, random weights, timing only)")
    big_json = out / "bench_vit_s_512.json"
    run([PY, "-m", "segm.bench", "--backbone", "vit_small_patch16_384", "--crop", 512, "--n-cls", 150,
         "--batch-size", 2, "--warmup", 1, "--repeats", 2 if quick else 5, "--no-memory",
         "--json", big_json, "--quiet"], logs / "bench_vit_s_512.log")
    big = json.loads(big_json.read_text())

    print("== 6. inference overlays and sharing maps")
    images = sorted((data_root / "images" / "validation").iterdir())[:4]
    sample_dir = out / "inference_input"
    sample_dir.mkdir(exist_ok=True)
    for im in images:
        shutil.copy(im, sample_dir / im.name)
    run([PY, "-m", "segm.inference", "--model-path", out / "runs" / "cts" / "checkpoint.pth",
         "-i", sample_dir, "-o", out / "inference", "--show-sharing", "--cpu"], logs / "inference.log")

    print()
    print(summary_table(scores, bench))
    print()
    print(speed_table(big))
    elapsed = time.perf_counter() - t_start
    print(f"\ntotal demo time: {elapsed / 60:.1f} min; everything is in {out}")
    check(scores, quick)


def _bench_row(bench: dict, policy: str) -> dict:
    for row in bench["variants"]:
        if row["policy"] == policy:
            return row
    raise KeyError(policy)


def summary_table(scores: dict, bench: dict) -> str:
    lines = [
        "| model | policy | tokens | mIoU | pixel acc | images/s (median) | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, policy in (("no_sharing", "no_sharing"), ("cts", "policy_net"), ("random", "random")):
        row = _bench_row(bench, policy)
        sc = scores[name]
        inf = row["inference"]
        lines.append(
            f"| Segmenter ViT-Ti/16 | {policy} | {row['tokens']} | {sc['mean_iou']:.2f} | "
            f"{sc['pixel_accuracy']:.2f} | {inf['img_s']['median']:.1f} | {inf['speedup']:.2f}× |"
        )
    return "\n".join(lines)


def speed_table(bench: dict) -> str:
    lines = ["| model (random weights) | policy | tokens | GFLOPs/img | images/s (median) | speed-up |",
             "|---|---|---|---|---|---|"]
    for policy in ("no_sharing", "policy_net"):
        row = _bench_row(bench, policy)
        inf = row["inference"]
        lines.append(f"| Segmenter ViT-S/16 @512 | {policy} | {row['tokens']} | {row['gflops']:.1f} | "
                     f"{inf['img_s']['median']:.2f} | {inf['speedup']:.2f}× |")
    return "\n".join(lines)


def check(scores: dict, quick: bool) -> None:
    cts, nos, rnd = (scores[k]["mean_iou"] for k in ("cts", "no_sharing", "random"))
    ok_gap = round(nos - cts, 2) <= 1.0  # scores are rounded to 2 decimals
    ok_random = rnd < cts
    print(f"CTS within 1.0 mIoU of no sharing: {'yes' if ok_gap else 'NO'} ({cts:.2f} vs {nos:.2f})")
    print(f"random policy below the learned policy: {'yes' if ok_random else 'NO'} ({rnd:.2f} vs {cts:.2f})")
    if quick:
        print("(--quick: short training, the two checks above are not meaningful)")


if __name__ == "__main__":
    main()
