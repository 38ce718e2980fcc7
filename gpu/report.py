"""summary.md of the GPU check: the machine, each step's outcome, the CUDA tests' counts (from
the JUnit file), the benchmark tables and the policy network's share of the CTS forward."""
from __future__ import annotations

import statistics
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path


def junit_counts(path: Path) -> dict | None:
    """{passed, failed, errors, skipped, problems: [(test, first line)], skips: Counter of reasons}."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "problems": [], "skips": Counter()}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            tag = "failure" if "failure" in kinds else "error"
            out["failed" if tag == "failure" else "errors"] += 1
            message = (kinds[tag].get("message") or kinds[tag].text or "").strip().splitlines()
            out["problems"].append((name, message[0][:300] if message else ""))
        elif "skipped" in kinds:
            out["skipped"] += 1
            out["skips"][(kinds["skipped"].get("message") or "").strip()[:300]] += 1
        else:
            out["passed"] += 1
    return out


def _tests_section(counts: dict | None) -> list[str]:
    if counts is None:
        return ["No JUnit file: the test step did not finish (see the steps above and pytest.log)."]
    lines = [f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
             f"{counts['skipped']} skipped."]
    lines += [f"- FAILED `{name}`: {message}" for name, message in counts["problems"]]
    lines += [f"- skipped ({n}×): {reason}" for reason, n in counts["skips"].items()]
    return lines


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def _variant(result: dict, name: str) -> dict | None:
    return next((v for v in result["variants"] if v["name"] == name), None)


def headline_rows(bench: dict) -> list[str]:
    """One row per finished benchmark run: images/s, CTS and content speed-ups, batch-1 latency."""
    rows = ["| run | no_sharing img/s | CTS img/s | CTS speed-up (paired) | content speed-up "
            "| b1 latency no_sharing / CTS ms | b1 speed-up |", "|---|---|---|---|---|---|---|"]
    for label, result in bench.items():
        if not isinstance(result, dict) or "variants" not in result:
            continue
        base, cts_v, content = (_variant(result, n) for n in ("no_sharing", "cts", "content"))
        if base is None or cts_v is None:
            continue
        inf = cts_v["inference"]
        lat = (f"{base['latency_b1']['ms']['median']:.1f} / {cts_v['latency_b1']['ms']['median']:.1f}",
               f"{cts_v['latency_b1']['speedup']:.2f}×") if "latency_b1" in cts_v else ("n/a", "n/a")
        content_speedup = f"{content['inference']['speedup']:.2f}×" if content else "n/a"
        rows.append(f"| {label} | {base['inference']['img_s']['median']:.1f} | {inf['img_s']['median']:.1f} "
                    f"| {inf['speedup']:.2f}× ({inf['speedup_paired']:.2f}×) | {content_speedup} "
                    f"| {lat[0]} | {lat[1]} |")
    return rows


def policy_rows(bench: dict, policy: dict | None) -> list[str]:
    """The policy network's time over the CTS forward time (batch 32) of each bf16 run."""
    if not policy or "eager_ms" not in policy:
        return ["Not measured (see the policy-share step above)."]
    rows = [f"Policy network alone (batch {policy['batch_size']}, {policy['size']} px, bf16): "
            f"eager {policy['eager_ms']:.2f} ms, compiled "
            + (f"{policy['compiled_ms']:.2f} ms." if "compiled_ms" in policy else "not measured."), "",
            "| run | CTS forward ms | policy share (eager policy) | policy share (compiled policy) |",
            "|---|---|---|---|"]
    for label, result in bench.items():
        cts_v = _variant(result, "cts") if isinstance(result, dict) and "variants" in result else None
        if cts_v is None or result["protocol"]["dtype"] != "bf16":
            continue
        total = _median_ms(cts_v["inference"]["times_s"])
        compiled = f"{100 * policy['compiled_ms'] / total:.1f} %" if "compiled_ms" in policy else "n/a"
        rows.append(f"| {label} | {total:.2f} | {100 * policy['eager_ms'] / total:.1f} % | {compiled} |")
    return rows


def bench_tables(bench: dict) -> list[str]:
    try:
        from segm.bench.report import format_table
    except Exception as e:  # noqa: BLE001 - the summary is still written
        return [f"Tables unavailable ({type(e).__name__}: {e}); the results are in bench.json."]
    lines = []
    for label, result in bench.items():
        lines += [f"### {label}", ""]
        if isinstance(result, dict) and "variants" in result:
            lines += [format_table(result), ""]
        else:
            lines += [f"No result: {result}", ""]
    return lines


def write_summary(path: Path, env: dict, steps: list, junit: dict | None, bench: dict,
                  policy: dict | None) -> None:
    lines = ["# GPU check", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += ["", "## Steps", "", "| step | outcome | seconds |", "|---|---|---|"]
    lines += [f"| {s.name} | {s.line()} | {s.seconds:.0f} |" for s in steps]
    lines += ["", "## CUDA tests (`pytest -m cuda`)", ""] + _tests_section(junit)
    headline = headline_rows(bench)
    lines += ["", "## Benchmarks: CTS 612/103 against no_sharing", ""]
    lines += headline if len(headline) > 2 else ["No benchmark run finished (see the steps above and bench.log)."]
    lines += ["", "## The policy network's share of the CTS forward", ""] + policy_rows(bench, policy)
    lines += ["", "## Benchmark tables", ""] + bench_tables(bench)
    path.write_text("\n".join(lines) + "\n")
