"""Screenshots of Prometheus under simulated drift, for the README (docs/monitoring-*.png) and the
report (07_report.py: ARTIFACTS/report/monitoring/).

Starts the API on ARTIFACTS (2 gunicorn workers), Prometheus and Alertmanager (monitoring/stack.py),
replays covariate drift then concept drift with 05_simulate.py, waits for the alerts, and takes
PNGs in headless Chromium (Debian's, driven by Playwright) of the drift and live-performance graphs
and of the alerts page. Then each panel of grafana_dashboard.json is drawn with matplotlib from the
same queries as range queries against that Prometheus (Grafana itself is not installable here: not
in Debian nor on PyPI/npm), and monitoring.json lists what was taken, for which model. Everything it
starts is stopped by PID. A few minutes.
  python monitoring/screenshots.py [--artifacts artifacts] [--out docs] [--seconds 45]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import stack

from rareml.artifacts import read_json, write_json
from rareml.model import MANIFEST_FILE
from rareml.processes import free_port, stop_group, wait_http
from rareml.registry import serving_dir

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


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    """Prometheus' range query: the matrix result ([] when the expression has no data)."""
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{query}", timeout=30) as response:
        body = json.load(response)
    return body["data"]["result"] if body.get("status") == "success" else []


def legend(fmt: str | None, labels: dict) -> str:
    """Grafana's legendFormat ({{label}} placeholders) applied to one series' labels."""
    if fmt:
        return re.sub(r"{{\s*(\w+)\s*}}", lambda m: str(labels.get(m.group(1), "")), fmt)
    shown = {k: v for k, v in labels.items() if k not in ("__name__", "job", "instance")}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or labels.get("__name__", "value")


def draw_panels(prometheus: str, out: Path, minutes: int, dashboard: Path = ROOT / "grafana_dashboard.json") -> list[dict]:
    """Each panel of the Grafana dashboard as a PNG, from its own queries over the last `minutes`."""
    import numpy as np

    from rareml import plots

    end = time.time()
    start, step = end - 60 * minutes, max(2.0, 60 * minutes / 240)
    drawn, section = [], ""
    for panel in json.loads(dashboard.read_text())["panels"]:
        if panel.get("type") == "row":
            section = panel.get("title", "")
            continue
        series = []
        for target in panel.get("targets", []):
            for result in query_range(prometheus, target["expr"], start, end, step):
                points = np.array(result["values"], float)
                series.append((legend(target.get("legendFormat"), result["metric"]), points[:, 0], points[:, 1]))
        name = f"panel-{panel['id']:02d}.png"
        figure = plots.panel(panel["title"], series, panel.get("fieldConfig", {}).get("defaults", {}).get("unit"),
                             panel.get("type", "timeseries"))
        figure.savefig(out / name, dpi=100)
        drawn.append({"file": name, "title": panel["title"], "section": section, "type": panel.get("type"),
                      "series": len(series), "queries": [t["expr"] for t in panel.get("targets", [])]})
    return drawn


def firing(prometheus: str) -> list[dict]:
    """The alerts Prometheus holds now (name, state, labels)."""
    with urllib.request.urlopen(f"{prometheus}/api/v1/alerts", timeout=30) as response:
        alerts = json.load(response)["data"]["alerts"]
    return [{"name": a["labels"].get("alertname"), "state": a["state"],
             "labels": {k: v for k, v in a["labels"].items() if k != "alertname"}} for a in alerts]


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
        minutes = max(5, 4 * args.seconds // 60 + 2)
        alerts = firing(monitoring.prometheus)
        shoot(monitoring.prometheus, args.out, minutes)
        panels = draw_panels(monitoring.prometheus, args.out, minutes)
        manifest = read_json(serving_dir(args.artifacts) / MANIFEST_FILE)
        write_json(args.out / "monitoring.json", {
            "model_version": manifest["model_version"], "taken_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "scenarios": ["none", "covariate", "concept"], "seconds_per_scenario": args.seconds, "window_minutes": minutes,
            "screenshots": list(GRAPHS) + ["monitoring-alerts.png"], "panels": panels, "alerts": alerts})
        print(f"screenshots in {args.out}: {', '.join(list(GRAPHS) + ['monitoring-alerts.png'])}; "
              f"{len(panels)} dashboard panels; monitoring.json")
    finally:
        stack.stop(work / "monitoring")
        stop_group(api)


if __name__ == "__main__":
    main()
