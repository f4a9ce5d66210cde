"""Stage 7: the project report (HTML and PDF) and a 12-minute slide deck, written from the run.

Describes the champion of ARTIFACTS (found in ARTIFACTS or the retraining's runs/<time>/ that
trained it), from what the stages wrote there: prepared.json, tuned.json and tuning/, the model's
manifest, reports/, the retraining gates, and monitoring screenshots taken for this very model
(monitoring/screenshots.py: the API, Prometheus, Alertmanager and the simulator, a few minutes;
reused while the champion stays the same). Writes ARTIFACTS/report/report.html and slides.html
(self-contained: every image embedded), and report.pdf and slides.pdf (WeasyPrint). Offline.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rareml import registry, report
from rareml.artifacts import read_json
from rareml.cli import DEFAULT_ARTIFACTS, require, run
from rareml.config import load_config
from rareml.errors import RareMLError

log = logging.getLogger("07_report")
ROOT = Path(__file__).resolve().parent


def monitoring_tools() -> str | None:
    """None when Prometheus, Alertmanager and Chromium are all here, else what is missing."""
    missing = [name for name, found in (("prometheus", shutil.which("prometheus")),
                                        ("prometheus-alertmanager", shutil.which("prometheus-alertmanager")
                                         or shutil.which("alertmanager")),
                                        ("chromium", Path("/usr/bin/chromium").exists())) if not found]
    return " ".join(missing) or None


def take_screenshots(root: Path, out: Path, seconds: int) -> None:
    """monitoring/screenshots.py for the champion of root, into out/monitoring/."""
    folder = out / "monitoring"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "monitoring" / "screenshots.py"), "--artifacts", str(root),
                           "--out", str(folder), "--seconds", str(seconds)], capture_output=True, text=True,
                          timeout=3 * seconds + 600, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RareMLError(f"monitoring/screenshots.py failed ({proc.returncode}):\n{tail}\n"
                          "(--monitoring skip writes the report without them)")
    log.info("monitoring screenshots in %s (%.0f s)", folder, time.monotonic() - started)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, type=Path, help="folder the stages share")
    parser.add_argument("--config", help="dataset config (default: the one prepare used, from prepared.json)")
    parser.add_argument("--out", type=Path, help="where to write (default: ARTIFACTS/report)")
    parser.add_argument("--model", default=registry.CHAMPION, choices=(*registry.ALIASES, "newest"),
                        help="which model to describe (default: the champion, which the API serves)")
    parser.add_argument("--monitoring", default="auto", choices=("auto", "run", "reuse", "skip"),
                        help="monitoring screenshots: auto = reuse those of this model, else take them when "
                             "Prometheus, Alertmanager and Chromium are installed; run = take them again")
    parser.add_argument("--monitoring-seconds", type=int, default=45, help="simulated traffic per scenario")
    parser.add_argument("--repo-url", default=os.environ.get("RAREML_REPO_URL"),
                        help="the repository's web address (default: RAREML_REPO_URL, else the git remote origin)")
    parser.add_argument("--space-repo", default=os.environ.get("SPACE_REPO"),
                        help="the Hugging Face Space user/name (default: SPACE_REPO)")
    parser.add_argument("--author", default=os.environ.get("RAREML_AUTHOR"), help="for the title page (RAREML_AUTHOR)")
    parser.add_argument("--no-pdf", action="store_true", help="HTML only")
    parser.add_argument("--no-tests", action="store_true", help="do not collect the test suite's counts")
    args = parser.parse_args(argv)
    root = args.artifacts
    folder, _ = report.locate(root, args.model)
    prepared = read_json(require(folder / "prepared.json", "prepare"))
    config = load_config(args.config or prepared["config"]["path"])
    out = args.out or root / "report"
    out.mkdir(parents=True, exist_ok=True)
    version = read_json(folder / "model" / "manifest.json")["model_version"]
    wanted, missing = args.monitoring, monitoring_tools()
    if wanted == "auto":
        have = report.monitoring(out, version)["taken"]
        wanted = "reuse" if have else ("run" if not missing else "skip")
        if wanted == "skip":
            log.warning("no monitoring screenshots: %s not installed (apt-get install %s)", missing, missing)
    if wanted == "run":
        if missing:
            raise RareMLError(f"--monitoring run needs {missing}: apt-get install {missing}")
        if args.model != registry.CHAMPION and registry.version_of(root, registry.CHAMPION) != version:
            raise RareMLError("the screenshots are of the model the API serves, the champion: use --model champion")
        take_screenshots(root, out, args.monitoring_seconds)
    facts = report.gather(root, config, out, args.model, repo_url=args.repo_url or report.git_remote(),
                          space_repo=args.space_repo, author=args.author, tests=not args.no_tests)
    written = {}
    for kind in ("report", "slides"):
        page = report.render(facts, f"{kind}.html")
        (out / f"{kind}.html").write_text(page, encoding="utf-8")
        written[f"{kind}.html"] = out / f"{kind}.html"
        if not args.no_pdf:
            report.write_pdf(page, out / f"{kind}.pdf")
            written[f"{kind}.pdf"] = out / f"{kind}.pdf"
    print(f"\nreport of model {version} ({facts['described']}):")
    for name, path in written.items():
        print(f"  {name:<12} {path}")
    if not facts["monitoring"]["taken"]:
        print(f"  monitoring:  not included: {facts['monitoring']['why']}")
    return {"out": str(out), "model_version": version, "files": {k: str(v) for k, v in written.items()}}


if __name__ == "__main__":
    run(main)
