#!/usr/bin/env python3
"""`make gpu-check OUT=dir` (python3 scripts/gpu_check.py DIR): the GPU path, proven, on one
CUDA GPU in about 8 minutes, with the machine's own Python (no .venv, nothing installed):

1. the wheels of gpu/wheels (gpu/requirements.txt) into a temporary folder, --no-deps, so the
   machine's torch stays; skipped, with the reason, when the folder is absent;
2. the CUDA tests, `pytest -m cuda` over the test files that hold such tests, JUnit XML;
3. the policy network alone at batch 32, 512 px, bf16 (gpu/policy_share.py);
4. `python -m segm.bench` at 512, 150 classes, batch 32, no_sharing against CTS 612/103 and the
   content policy, interleaved, random inputs, batch-1 latency too: ViT-S/16 and ViT-B/16 in
   bf16 autocast + SDPA + torch.compile, then in fp32 eager;
5. summary.md: the machine, each step's outcome, the tests' counts, the tables, the policy
   network's share of the CTS forward.

Each step has a time limit inside the total budget (--budget, 450 s; a step stopped at its limit
gets 20 s more to exit, so the whole ends within 8 minutes): a step that fails or runs out of
time is recorded and the check goes on. Everything goes to DIR, in at most 7 files:
summary.md, steps.json, pytest.xml, pytest.log, bench.json, bench.log, check.log. Without CUDA
it prints one line and exits 2, having run nothing. Exit 0: every step ran and every test passed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpu.report import junit_counts, write_summary  # noqa: E402
from gpu.steps import Budget, StepResult, run_step  # noqa: E402
from gpu.wheel_list import WHEEL_DIR, WheelListError, match_wheels, wheel_specs  # noqa: E402

BENCH_ARGS = ["--device", "cuda", "--crop", "512", "--n-cls", "150", "--decoder", "mask_transformer",
              "--batch-size", "32", "--num-tokens-shared", "103", "--with-content", "--inputs", "random",
              "--latency", "--warmup", "3", "--repeats", "20"]
# (label, backbone, mode flags, cap s, minimum s), in the order they run
BENCH_RUNS = [
    ("ViT-S/16 bf16 + SDPA + compile", "vit_small_patch16_384", ["--dtype", "bf16", "--sdpa", "--compile"], 130, 40),
    ("ViT-B/16 bf16 + SDPA + compile", "vit_base_patch16_384", ["--dtype", "bf16", "--sdpa", "--compile"], 150, 40),
    ("ViT-S/16 fp32 eager", "vit_small_patch16_384", ["--dtype", "fp32", "--no-compile"], 60, 40),
    ("ViT-B/16 fp32 eager", "vit_base_patch16_384", ["--dtype", "fp32", "--no-compile"], 75, 40),
]
# (step, cap s, minimum s) of the steps before the benchmarks
STEPS = [("install wheels", 60, 5), ("import mmseg", 30, 5), ("CUDA tests", 170, 30), ("policy share", 50, 15)]
PLAN = STEPS + [(label, cap, low) for label, _, _, cap, low in BENCH_RUNS]


def reserve_after(name: str) -> float:
    """The least time the steps after `name` need."""
    names = [n for n, _, _ in PLAN]
    return sum(low for _, _, low in PLAN[names.index(name) + 1:])


def cap_and_min(name: str) -> tuple[float, float]:
    return next((cap, low) for n, cap, low in PLAN if n == name)


class Check:
    """The output folder, the temporary folder, the budget and the steps' environment."""

    def __init__(self, out: Path, tmp: Path, budget: Budget):
        self.out, self.tmp, self.budget = out, tmp, budget
        self.site = tmp / "site"  # the carried wheels, installed
        self.steps: list[StepResult] = []
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
                    "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"), "TRITON_CACHE_DIR": str(tmp / "triton")}
        self.set_path(with_site=False)

    def set_path(self, with_site: bool) -> None:
        # the repository first: a carried wheel ships a top-level `tests` package of its own
        parts = [str(REPO)] + ([str(self.site)] if with_site else []) + [os.environ.get("PYTHONPATH", "")]
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)

    def run(self, name: str, cmd: list[str], log: str, env: dict | None = None) -> StepResult:
        cap, low = cap_and_min(name)
        result = run_step(name, cmd, timeout=self.budget.timeout(cap, reserve_after(name)), min_s=low,
                          log_path=self.out / log, env=env or self.env, cwd=REPO)
        self.steps.append(result)
        return result

    def skip(self, name: str, note: str) -> None:
        self.steps.append(StepResult(name, "skipped", note=note))


def install_wheels(check: Check) -> None:
    try:
        found, missing, _ = match_wheels(wheel_specs())
    except WheelListError as e:
        check.steps.append(StepResult("install wheels", "failed", note=str(e)))
        return
    if not found:
        check.skip("install wheels", f"{WHEEL_DIR.relative_to(REPO)} is absent or empty (run `make gpu-wheels` "
                   "where PyPI is reachable, then carry gpu/wheels); tests that need mmseg are skipped")
        return
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--find-links", str(WHEEL_DIR), "--target", str(check.site),
           *[f"{n}=={v}" for n, v in found]]
    result = check.run("install wheels", cmd, "check.log")
    if missing:
        absent = "missing from gpu/wheels: " + ", ".join(f"{n}=={v}" for n, v in missing)
        result.note = f"{result.note}; {absent}" if result.note else absent
    check.set_path(with_site=result.status == "ok")
    probe = "import mmcv, mmseg, mmseg.datasets; print('mmcv', mmcv.__version__, 'mmseg', mmseg.__version__)"
    if check.run("import mmseg", [sys.executable, "-c", probe], "check.log").status != "ok":
        check.steps[-1].note = "tests that need mmseg are skipped (see check.log)"


def cuda_test_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text())


def run_tests(check: Check) -> None:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-rs", "-q",
           f"--junitxml={check.out / 'pytest.xml'}", f"--basetemp={check.tmp / 'pytest'}"]
    if find_spec("xdist"):
        cmd += ["-n", "4"]  # the compile test dominates; the others run beside it
    if find_spec("pytest_timeout"):
        cmd += ["--timeout", "150"]
    check.run("CUDA tests", cmd + cuda_test_files(), "pytest.log")


def run_policy_share(check: Check) -> dict | None:
    path = check.tmp / "policy.json"
    check.run("policy share", [sys.executable, "-m", "gpu.policy_share", "--json", str(path)], "check.log")
    return json.loads(path.read_text()) if path.is_file() else None


def run_benchmarks(check: Check) -> dict:
    """{label: result dict, or why there is none}."""
    results = {}
    # batch 32 and batch 1 each compile to their own static graph
    env = {**check.env, "TORCH_DYNAMO_AUTOMATIC_DYNAMIC_SHAPES": "0"}
    for i, (label, backbone, mode, _, _) in enumerate(BENCH_RUNS):
        path = check.tmp / f"bench{i}.json"
        cmd = [sys.executable, "-m", "segm.bench", "--backbone", backbone, *mode, *BENCH_ARGS, "--json", str(path)]
        step = check.run(label, cmd, "bench.log", env=env)
        results[label] = json.loads(path.read_text()) if path.is_file() else step.line()
    return results


def environment(torch) -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    try:
        from importlib.metadata import version
        timm = version("timm")
    except Exception:  # noqa: BLE001 - reported, not needed here
        timm = "not installed"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "GPU": f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs "
               f"(compute capability {props.major}.{props.minor}), driver {driver}",
        "torch": f"{torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}",
        "Python": f"{platform.python_version()} ({sys.executable}), timm {timm}",
    }


def cuda_torch():
    """(torch, None), or (None, why there is nothing to check)."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any failure: say it in one line
        return None, f"torch is not importable by {sys.executable} ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return None, f"no CUDA device (torch {torch.__version__}, {sys.executable})"
    return torch, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="The CUDA tests and GPU benchmarks; results only in OUT.")
    ap.add_argument("out", type=Path, help="Output folder (created).")
    ap.add_argument("--budget", type=float, default=450, help="Wall-clock seconds for all the steps.")
    args = ap.parse_args(argv)
    torch, reason = cuda_torch()
    if torch is None:
        print(f"gpu-check: {reason}: nothing run", file=sys.stderr)
        return 2
    budget = Budget(args.budget)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="segm-gpu-check-") as tmp:
        check = Check(out, Path(tmp), budget)
        env = environment(torch)
        install_wheels(check)
        run_tests(check)
        policy = run_policy_share(check)
        bench = run_benchmarks(check)
        junit = junit_counts(out / "pytest.xml")
        (out / "bench.json").write_text(json.dumps({"runs": bench, "policy_share": policy}, indent=1))
        (out / "steps.json").write_text(json.dumps([s.as_dict() for s in check.steps], indent=1))
        write_summary(out / "summary.md", env, check.steps, junit, bench, policy)
    print(f"gpu-check: {out / 'summary.md'}")
    return 0 if complete(check.steps, junit) else 1


def complete(steps: list[StepResult], junit: dict | None) -> bool:
    """Every step ran (absent wheels excepted) and every selected test passed or was skipped."""
    ran = all(s.status == "ok" or (s.status == "skipped" and s.name == "install wheels") for s in steps)
    return ran and junit is not None and junit["failed"] + junit["errors"] == 0


if __name__ == "__main__":
    sys.exit(main())
