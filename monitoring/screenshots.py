"""Screenshots of Prometheus under simulated drift, for the report (docs/monitoring-*.png).

Starts the API on ARTIFACTS (2 gunicorn workers), Prometheus and Alertmanager (monitoring/stack.py),
replays covariate drift then concept drift with 05_simulate.py, waits for the alerts, and takes
PNGs in headless Chromium (Debian's, driven by Playwright) of the drift and live-performance graphs
and of the alerts page. Everything it starts is stopped by PID. A few minutes.
  python monitoring/screenshots.py [--artifacts artifacts] [--out docs]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import stack

from rareml.processes import free_port, stop_group, wait_http

ROOT = Path(__file__).resolve().parent.parent
GRAPHS = {
    "monitoring-drift.png": ["rareml_feature_psi", "rareml_prediction_psi"],
    "monitoring-live-performance.png": ["rareml_live_metric", "rareml_validation_metric{metric=~\"precision|recall|average_precision\"}"],
}


def graph_url(prometheus: str, exprs: list[str], minutes: int) -> str:
    params = {}
    for i, expr in enumerate(exprs):
        params |= {f"g{i}.expr": expr, f"g{i}.tab": "0", f"g{i}.range_input": f"{minutes}m"}
    return f"{prometheus}/graph?{urllib.parse.urlencode(params)}"


def simulate(api: str, artifacts: Path, scenario: str, seconds: int) -> None:
    subprocess.run([sys.executable, str(ROOT / "05_simulate.py"), "--url", api, "--artifacts", str(artifacts),
                    "--scenario", scenario, "--rate", "30", "--seconds", str(seconds), "--feedback-delay", "2"],
                   check=True, timeout=seconds + 120, stdout=subprocess.DEVNULL)


def shoot(prometheus: str, out: Path, minutes: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            for name, exprs in GRAPHS.items():
                page.goto(graph_url(prometheus, exprs, minutes), wait_until="domcontentloaded")
                page.wait_for_timeout(5000)  # the graph draws after its queries return
                page.add_style_tag(content="nav, .navbar { position: static !important; }")
                page.screenshot(path=str(out / name), full_page=True)
            response = page.goto(f"{prometheus}/alerts", wait_until="domcontentloaded")
            if response is None or response.status == 404:  # Debian's build serves the classic UI only
                page.goto(f"{prometheus}/classic/alerts", wait_until="domcontentloaded")
            page.wait_for_timeout(2500)
            page.evaluate("document.querySelectorAll('.alert_header, tr.alert_header')"  # unfold each alert
                          ".forEach(header => header.click())")
            page.wait_for_timeout(1000)
            page.add_style_tag(content="nav, .navbar { position: static !important; }")
            page.screenshot(path=str(out / "monitoring-alerts.png"), full_page=True)
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--seconds", type=int, default=45, help="per scenario")
    args = parser.parse_args()
    work, token, port = Path(tempfile.mkdtemp(prefix="rareml-shots-")), os.urandom(8).hex(), free_port()
    api = subprocess.Popen([sys.executable, str(ROOT / "04_serve.py"), "--artifacts", str(args.artifacts), "--port",
                            str(port), "--db", str(work / "log.db"), "--refresh", "2"], start_new_session=True,
                           env=os.environ | {"RAREML_ALERT_TOKEN": token, "PROMETHEUS_MULTIPROC_DIR": str(work / "m")},
                           stdout=subprocess.DEVNULL, stderr=open(work / "api.log", "wb"))  # noqa: SIM115
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", api, log=work / "api.log")
        monitoring = stack.start(work / "monitoring", api=f"127.0.0.1:{port}", prometheus_port=free_port(),
                                 alertmanager_port=free_port(), token=token)
        simulate(f"http://127.0.0.1:{port}", args.artifacts, "none", args.seconds)
        simulate(f"http://127.0.0.1:{port}", args.artifacts, "covariate", args.seconds)
        simulate(f"http://127.0.0.1:{port}", args.artifacts, "concept", args.seconds)
        time.sleep(45)  # the alerts' `for`
        args.out.mkdir(parents=True, exist_ok=True)
        shoot(monitoring.prometheus, args.out, minutes=max(5, 4 * args.seconds // 60 + 2))
        print(f"screenshots in {args.out}: {', '.join(list(GRAPHS) + ['monitoring-alerts.png'])}")
    finally:
        stack.stop(work / "monitoring")
        stop_group(api)


if __name__ == "__main__":
    main()
