"""`make demo` end to end in its --quick form (every CLI in one pipeline; figures not checked)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| Segmenter ViT-Ti/16 | policy_net | policy_net |" in proc.stdout
    assert "| Segmenter ViT-Ti/16 | no_sharing | content |" in proc.stdout
    assert "CTS within 1.0 mIoU of no sharing:" in proc.stdout
    for run in ("no_sharing", "cts", "random", "content"):
        assert (out / "runs" / run / "scores_ss.yml").is_file()
    for policy in ("content", "policy_net", "random"):
        assert (out / "runs" / "no_sharing" / f"scores_ss_{policy}_s4.yml").is_file()
    bench = json.loads((out / "bench.json").read_text())
    assert [v["name"] for v in bench["variants"]] == ["no_sharing", "cts", "random", "content", "algm_static"]
    assert (out / "runs" / "no_sharing" / "scores_ss_algm_static.yml").is_file()
    assert sorted(p.name for p in (out / "inference").glob("*_sharing.png"))
