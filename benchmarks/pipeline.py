"""Benchmark: run the three stages on a dataset with a fixed tuning budget and report, per stage,
wall time and peak memory (resident set of the stage's process), plus the test average precision.

    .venv/bin/python benchmarks/pipeline.py --config configs/census_income_kdd.toml --budget 420

Writes benchmarks/results/pipeline-<name>.json and .md. A benchmark, not a test: figures on a
shared machine vary; compare runs made side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_stage(script: str, args: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one stage run in its own process."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    stderr = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{script} failed:\n{stderr[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "census_income_kdd.toml"))
    parser.add_argument("--budget", type=float, default=420)
    args = parser.parse_args()
    config = Path(args.config).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = ["--config", str(config), "--artifacts", str(work / "artifacts")]
        stages, started_at = {}, time.time()  # the budget covers all three stages, as in `make all`
        for script, extra in (("01_prepare.py", []),
                              ("02_tune.py", ["--time-budget", str(args.budget), "--started-at", str(started_at)]),
                              ("03_serialize.py", [])):
            seconds, peak = run_stage(script, common + extra, work)
            stages[script] = {"seconds": round(seconds, 1), "peak_rss_mib": round(peak)}
            print(f"{script:16s} {seconds:8.1f} s   peak RSS {peak:7.0f} MiB", flush=True)
        manifest = json.loads((work / "artifacts" / "model" / "manifest.json").read_text())
        tuned = json.loads((work / "artifacts" / "tuned.json").read_text())
    test, ci = manifest["metrics"]["test"], manifest["metrics"]["test_ci"]
    result = {
        "dataset": manifest["name"], "budget_s": args.budget, "stages": stages,
        "total_seconds": round(sum(s["seconds"] for s in stages.values()), 1),
        "trials": tuned["trials"], "cv_average_precision": tuned["cv"]["average_precision"],
        "test": {k: {"value": test[k], "ci95": ci[k]} for k in ("average_precision", "roc_auc", "brier")},
        "no_skill_average_precision": manifest["metrics"]["no_skill"]["average_precision"],
        "calibration": manifest["calibration"]["method"], "threshold": manifest["threshold"],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out = ROOT / "benchmarks" / "results" / f"pipeline-{manifest['name']}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Pipeline benchmark: {manifest['name']}, budget {args.budget:.0f} s for the three stages", "",
             f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, {result['date']}.", "",
             "| stage | wall time (s) | peak RSS (MiB) |", "|---|---|---|"]
    lines += [f"| {name} | {s['seconds']} | {s['peak_rss_mib']} |" for name, s in stages.items()]
    lines += [f"| **total** | **{result['total_seconds']}** | |", "",
              f"Trials: {tuned['trials']}. CV average precision {tuned['cv']['average_precision']:.4f}.", "",
              "| test metric | value | 95% CI |", "|---|---|---|"]
    lines += [f"| {k} | {v['value']:.4f} | [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] |" for k, v in result["test"].items()]
    lines += ["", f"No-skill average precision: {result['no_skill_average_precision']:.4f}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
