"""`make demo`: the whole CTS pipeline on generated data, on the CPU, with no network.

Generates the synthetic dataset, trains the policy network, trains Segmenter (ViT-Tiny) without
sharing, with CTS (the learned policy), with the random policy and with the training-free
content policy on the same token budget, evaluates them, evaluates the no-sharing checkpoint
with each policy and with ALGM (static) without retraining, benchmarks, writes inference
overlays and sharing maps, and prints a table. Every step is the real command line a researcher would run, so the demo
is also an end-to-end check. Trainings and evaluations run side by side, one per core on one
thread each (`run_jobs`); the benchmarks run alone.

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
from dataclasses import dataclass
from pathlib import Path

import click

from segm.utils.cli import CONTEXT_SETTINGS

PY = sys.executable
BACKBONE = "vit_tiny_patch16_384"
# Windows of 128 px on images of 256 px (configs/config.yml: synthetic): N = 64 patches,
# 16 superpatches per window. S = 4 shared (U = 48, T = 52, 19 % fewer tokens).
S = 4
# Trained models: name → the policy options of segm.train.
TRAINED = {
    "no_sharing": ["--policy-method", "no_sharing"],
    "cts": ["--policy-method", "policy_net", "--num-tokens-shared", S],  # + --policynet-ckpt
    "random": ["--policy-method", "random", "--num-tokens-shared", S],
    "content": ["--policy-method", "content", "--num-tokens-shared", S],
}
TRAINED_POLICY = {"no_sharing": "no_sharing", "cts": "policy_net", "random": "random", "content": "content"}
# The no_sharing checkpoint evaluated with a policy chosen on the command line (no retraining).
RESHARED = ("content", "policy_net", "random")
# ... and with ALGM (token merging inside the encoder), static mode: 64 → 52 → 44 tokens.
ALGM = "algm_static"


@dataclass
class Demo:
    out: Path
    quick: bool

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def data_root(self) -> Path:
        return self.out / "datasets" / "synthetic"

    @property
    def policy(self) -> Path:
        return self.out / "policynet" / "synthetic" / "model.pth"

    def ckpt(self, name: str) -> Path:
        return self.out / "runs" / name / "checkpoint.pth"

    def run(self, args: list, log: str) -> None:
        """Runs one command, echoing it; its output goes to logs/<log> (the tail to the console on failure)."""
        print(f"$ {' '.join(str(a) for a in args)}", flush=True)
        path = self.logs / log
        t0 = time.perf_counter()
        with open(path, "w") as f:
            proc = subprocess.run([str(a) for a in args], stdout=f, stderr=subprocess.STDOUT, env=os.environ)
        if proc.returncode != 0:
            print("\n".join(path.read_text().splitlines()[-25:]))
            raise SystemExit(f"demo step failed (exit {proc.returncode}); full log: {path}")
        print(f"  done in {time.perf_counter() - t0:.0f} s (log: {path})", flush=True)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--out", default="demo_out", type=click.Path(file_okay=False), show_default=True)
@click.option("--quick", is_flag=True, help="A much shorter run (smoke test; figures not meaningful).")
@click.option("--fresh", is_flag=True, help="Delete --out first.")
def main(out, quick, fresh):
    demo = Demo(Path(out).resolve(), quick)
    if fresh and demo.out.exists():
        shutil.rmtree(demo.out)
    demo.logs.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    prepare_data(demo)
    run_jobs(demo, [*policy_job(demo), *training_jobs(demo), *evaluation_jobs(demo)])
    scores = read_scores(demo)
    bench, big = benchmark(demo)  # alone on the machine: timings
    inference(demo)
    print()
    print(summary_table(scores, bench))
    print()
    print(speed_table(big))
    print(f"\ntotal demo time: {(time.perf_counter() - t_start) / 60:.1f} min; everything is in {demo.out}")
    check(scores, quick)


def prepare_data(demo: Demo) -> None:
    n_train, n_val = (40, 12) if demo.quick else (400, 100)
    print(f"== 1. synthetic dataset ({n_train} train / {n_val} val)")
    demo.run([PY, "-m", "segm.scripts.prepare_synthetic", demo.out / "datasets", "--num-train", n_train,
              "--num-val", n_val, "--size", 256, "--seed", 0], "prepare.log")


@dataclass
class Job:
    """One command of the training and evaluation phase: its log's name, its command, what it waits for."""

    name: str
    args: list
    title: str
    after: tuple = ()
    alone: bool = False  # runs with nothing beside it, with torch's default threads


def policy_job(demo: Demo) -> list[Job]:
    iters = 20 if demo.quick else 500
    if demo.policy.is_file():  # a re-run reuses the trained policy
        return []
    # Alone and multi-threaded: at one thread PyTorch sends the 1×1 convolutions of a batch below 16
    # to another kernel (im2col), whose rounding changes the trained policy and the CTS figures.
    return [Job("policynet", [
        PY, "-m", "policynet.train", "--dataset", "synthetic", "--data-root", demo.data_root,
        "--exp_name", "synthetic", "--logdir", demo.out / "policynet", "--backbone", "tf_efficientnet_lite0",
        "--pretrained", "lite0", "--num_iterations", iters, "--eval_iterations", iters,
        "--batch_size_train", 8, "--device", "cpu", "--num-shared", S,
        # the reference lr 5e-5 is tuned for 50 000 iterations; 500 need a larger step
        "--lr", "2e-4", "--no-progress"], f"2. policy network ({iters} iterations)", alone=True)]


def training_jobs(demo: Demo) -> list[Job]:
    """The four trainings; each is evaluated by its own segm.eval.miou job, not at its end as well."""
    iters = 20 if demo.quick else 600
    jobs = []
    for name, policy_args in TRAINED.items():
        after = ("policynet",) if name == "cts" else ()
        if name == "cts":
            policy_args = [*policy_args, "--policynet-ckpt", demo.policy]
        jobs.append(Job(f"train_{name}", [
            PY, "-m", "segm.train", "--log-dir", demo.ckpt(name).parent, "--dataset", "synthetic",
            "--data-root", demo.data_root, "--backbone", BACKBONE, "--pretrained", "none",
            "--decoder", "mask_transformer", "--iterations", iters, "--batch-size", 8,
            "-lr", "1e-3", "--eval-freq", 0, "--no-final-eval", "--device", "cpu", "--seed", 0, *policy_args],
            f"3. Segmenter {BACKBONE} [{name}] ({iters} iterations)", after))
    return jobs


def evaluation_jobs(demo: Demo) -> list[Job]:
    """mIoU of every trained model, and of the no_sharing checkpoint run with each policy and ALGM."""
    common = ["synthetic", "--data-root", demo.data_root, "--singlescale", "--device", "cpu"]
    jobs = [Job(f"eval_{name}", [PY, "-m", "segm.eval.miou", demo.ckpt(name), *common],
                f"4. evaluate [{name}]", (f"train_{name}",)) for name in TRAINED]
    plain = demo.ckpt("no_sharing")
    for policy in RESHARED:
        extra = ["--policynet-ckpt", demo.policy] if policy == "policy_net" else []
        jobs.append(Job(f"eval_no_sharing_{policy}", [
            PY, "-m", "segm.eval.miou", plain, *common, "--policy-method", policy, "--num-tokens-shared", S, *extra],
            f"4b. evaluate [no_sharing checkpoint with the {policy} policy, S = {S}, no retraining]",
            ("train_no_sharing", "policynet") if policy == "policy_net" else ("train_no_sharing",)))
    jobs.append(Job(f"eval_no_sharing_{ALGM}", [PY, "-m", "segm.eval.miou", plain, *common, "--reducer", "algm"],
                    "4c. evaluate [no_sharing checkpoint with ALGM static, no retraining]", ("train_no_sharing",)))
    return jobs


def run_jobs(demo: Demo, jobs: list[Job]) -> None:
    """Runs `jobs` in list order as their dependencies allow, one per core at a time, each with one
    intra-op thread (on 2 cores, two one-thread runs side by side beat one two-thread run after the
    other, with the same figures, BENCHMARKS.md "The demo"); an `alone` job runs by itself."""
    from segm.utils.threads import cores_per_process

    lanes = cores_per_process()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    names = {j.name for j in jobs}
    done, pending, running = set(), list(jobs), {}
    while pending or running:
        ready = [j for j in pending if all(a in done or a not in names for a in j.after)]
        for job in ready:
            busy = len(running)
            if busy >= lanes or (busy and (job.alone or any(r[0].alone for r in running.values()))):
                break
            pending.remove(job)
            print(f"== {job.title}\n$ {' '.join(str(a) for a in job.args)}", flush=True)
            log = open(demo.logs / f"{job.name}.log", "w")
            proc = subprocess.Popen([str(a) for a in job.args], stdout=log, stderr=subprocess.STDOUT,
                                    env=os.environ if job.alone else env)
            running[job.name] = (job, proc, log, time.perf_counter())
        time.sleep(0.2)
        for name, (job, proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            path = demo.logs / f"{name}.log"
            if proc.returncode != 0:
                for _, other, _, _ in running.values():
                    other.terminate()
                print("\n".join(path.read_text().splitlines()[-25:]))
                raise SystemExit(f"demo step failed (exit {proc.returncode}); full log: {path}")
            done.add(name)
            print(f"  done in {time.perf_counter() - t0:.0f} s: {job.title} (log: {path})", flush=True)


def read_scores(demo: Demo) -> dict:
    from segm.config import load_yaml

    scores = {name: load_yaml(demo.ckpt(name).parent / "scores_ss.yml") for name in TRAINED}
    plain = demo.ckpt("no_sharing").parent
    for policy in RESHARED:
        scores[f"no_sharing+{policy}"] = load_yaml(plain / f"scores_ss_{policy}_s{S}.yml")
    scores[f"no_sharing+{ALGM}"] = load_yaml(plain / f"scores_ss_{ALGM}.yml")
    return scores


def benchmark(demo: Demo) -> tuple[dict, dict]:
    print("== 5. benchmark (no_sharing vs CTS vs random vs content, interleaved, validation images)")
    bench_json = demo.out / "bench.json"
    demo.run([PY, "-m", "segm.bench", "--model-path", demo.ckpt("cts"), "--with-random", "--with-content",
              "--reducer", "algm",
              "--inputs", "synthetic:val", "--data-root", demo.data_root, "--batch-size", 8, "--warmup", 2,
              "--repeats", 3 if demo.quick else 10, "--json", bench_json, "--quiet"], "bench.log")
    print("== 5b. where CTS pays: ViT-S/16 at 512 (150 classes, batch 2, random weights, timing only)")
    big_json = demo.out / "bench_vit_s_512.json"
    demo.run([PY, "-m", "segm.bench", "--backbone", "vit_small_patch16_384", "--crop", 512, "--n-cls", 150,
              "--batch-size", 2, "--warmup", 1, "--repeats", 2 if demo.quick else 5, "--no-memory",
              "--with-content", "--reducer", "algm", "--json", big_json, "--quiet"], "bench_vit_s_512.log")
    return json.loads(bench_json.read_text()), json.loads(big_json.read_text())


def inference(demo: Demo) -> None:
    print("== 6. inference overlays and sharing maps")
    sample_dir = demo.out / "inference_input"
    sample_dir.mkdir(exist_ok=True)
    for im in sorted((demo.data_root / "images" / "validation").iterdir())[:4]:
        shutil.copy(im, sample_dir / im.name)
    demo.run([PY, "-m", "segm.inference", "--model-path", demo.ckpt("cts"), "-i", sample_dir,
              "-o", demo.out / "inference", "--show-sharing", "--cpu"], "inference.log")


def _bench_row(bench: dict, used: str) -> dict:
    """The benchmark's row of a policy (CTS) or of a variant name (another reducer)."""
    for row in bench["variants"]:
        if used in (row["policy"], row["name"]):
            return row
    raise KeyError(used)


def summary_table(scores: dict, bench: dict) -> str:
    lines = [
        "| model | trained with | evaluated with | tokens | mIoU | pixel acc | images/s (median) | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [(name, TRAINED_POLICY[name], TRAINED_POLICY[name]) for name in TRAINED]
    rows += [(f"no_sharing+{p}", "no_sharing", p) for p in RESHARED]
    rows.append((f"no_sharing+{ALGM}", "no_sharing", ALGM))
    for key, trained, used in rows:
        bench_row = _bench_row(bench, used)
        inf, sc = bench_row["inference"], scores[key]
        lines.append(
            f"| Segmenter ViT-Ti/16 | {trained} | {used} | {bench_row['tokens']} | {sc['mean_iou']:.2f} | "
            f"{sc['pixel_accuracy']:.2f} | {inf['img_s']['median']:.1f} | {inf['speedup']:.2f}× |"
        )
    return "\n".join(lines)


def speed_table(bench: dict) -> str:
    lines = ["| model (random weights) | policy | tokens | GFLOPs/img | images/s (median) | speed-up |",
             "|---|---|---|---|---|---|"]
    for policy in ("no_sharing", "policy_net", "content", ALGM):
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
    content, reshared = scores["content"]["mean_iou"], scores["no_sharing+content"]["mean_iou"]
    print(f"content policy: trained with it {content:.2f}, no_sharing checkpoint with it {reshared:.2f} "
          f"(learned policy {cts:.2f}, no sharing {nos:.2f})")
    if quick:
        print("(--quick: short training, the checks above are not meaningful)")


if __name__ == "__main__":
    main()
