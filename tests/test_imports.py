"""Commands that read no dataset start without importing mmseg/mmcv (seconds of start-up)."""
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


@pytest.mark.parametrize("module", COMMANDS)
def test_help_does_not_import_mmseg(module):
    probe = PROBE.format(module=module, heavy=HEAVY)
    res = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "Usage:" in res.stdout
    loaded = res.stdout.splitlines()[-1]
    assert loaded == "loaded: []", f"python -m {module} --help imports mmseg/mmcv ({loaded})"
