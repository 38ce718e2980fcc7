"""Commands that read no dataset start without importing mmseg/mmcv (seconds of start-up).

One interpreter probes every command: it imports the third-party stack the commands share
(torch, timm, ...; never mmseg or mmcv, which it checks), then forks one child per command,
so each command starts from the same modules a fresh `python -m COMMAND --help` would have
after those imports, and reports its exit status, output and the heavy modules it loaded."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("mmseg", "mmcv")
# Runs `python -m MODULE --help` in this interpreter, then prints which heavy modules it loaded.
PROBE = """
import runpy, sys
sys.argv = [{module!r}, "--help"]
try:
    runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
except SystemExit as e:
    if e.code not in (0, None):
        raise
print("loaded:", sorted(m for m in {heavy!r} if m in sys.modules))
"""
COMMANDS = [
    "policynet.train",
    "policynet.eval",
    "segm.scripts.prepare_ade20k",
    "segm.scripts.prepare_cityscapes",
    "segm.scripts.prepare_pcontext",
    "segm.scripts.prepare_synthetic",
]
# `segm.bench --help` through click (moved here from test_bench.py: one interpreter for all probes).
BENCH_PROBE = ("import sys; from click.testing import CliRunner; from segm.bench.cli import main; "
               "assert CliRunner().invoke(main, ['--help']).exit_code == 0; "
               "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mmseg', 'mmcv')))")
# `gpu.policy_share -h` without a GPU (moved here from test_gpu_check.py).
POLICY_SHARE_PROBE = ("import os; os.environ['CUDA_VISIBLE_DEVICES'] = ''\n"
                      "import runpy, sys\nsys.argv = ['policy_share', '-h']\ntry:\n"
                      "    runpy.run_module('gpu.policy_share', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                      "print(sorted(m for m in ('mmseg', 'mmcv') if m in sys.modules), 'segm.bench.timing' in sys.modules)")
# The parent: shared imports, then one forked child per probe (stdout/stderr to files).
RUNNER = r"""
import importlib, json, os, sys, tempfile, traceback
HEAVY = {heavy!r}
for name in ("numpy", "torch", "torchvision", "timm", "click", "click.testing", "yaml", "PIL.Image", "tqdm"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
assert not [m for m in sys.modules if m.split(".")[0] in HEAVY], "the shared imports load mmseg/mmcv"
results = {{}}
for key, code in json.loads(sys.argv[1]).items():
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        status = 0
        try:
            exec(compile(code, "<probe>", "exec"), {{"__name__": "__probe__"}})
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            status = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    out.seek(0); err.seek(0)
    results[key] = {{"returncode": os.waitstatus_to_exitcode(wait_status),
                    "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}}
sys.stdout.write(json.dumps(results))
"""


@pytest.fixture(scope="module")
def probes():
    """{probe: {returncode, stdout, stderr}}, from one interpreter."""
    codes = {module: PROBE.format(module=module, heavy=HEAVY) for module in COMMANDS}
    codes["segm.bench"] = BENCH_PROBE
    codes["gpu.policy_share"] = POLICY_SHARE_PROBE
    res = subprocess.run([sys.executable, "-c", RUNNER.format(heavy=HEAVY), json.dumps(codes)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("module", COMMANDS)
def test_help_does_not_import_mmseg(probes, module):
    res = probes[module]
    assert res["returncode"] == 0, res["stderr"]
    assert "Usage:" in res["stdout"]
    loaded = res["stdout"].splitlines()[-1]
    assert loaded == "loaded: []", f"python -m {module} --help imports mmseg/mmcv ({loaded})"


def test_bench_help_does_not_import_the_dataset_stack(probes):
    res = probes["segm.bench"]
    assert res["returncode"] == 0, res["stderr"]  # was subprocess.run(..., check=True)
    assert res["stdout"].strip() == "[]"


def test_policy_share_times_with_the_bench_timer(probes):
    """`gpu.policy_share` times with `segm.bench.timing` (as the benchmark it is divided by), and
    what it imports loads without mmseg/mmcv, which the bare GPU machine may lack."""
    res = probes["gpu.policy_share"]
    assert res["returncode"] == 0, res["stderr"]
    assert "usage:" in res["stdout"] and res["stdout"].splitlines()[-1] == "[] True", res["stdout"]
