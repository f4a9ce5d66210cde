"""The monitoring stack for real: Debian's Prometheus and Alertmanager on 127.0.0.1 (started by
monitoring/stack.py, as `make monitor` does), the API under gunicorn on the session's small model,
and 05_simulate.py sending traffic with delayed labels. With covariate drift the drift metric
rises, the alert fires and the API's webhook records it; every Grafana panel's query returns data.
With no drift, no drift alert fires. Every process is stopped by PID, also on failure."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from rareml.processes import free_port
from tests.conftest import ROOT
from tests.integration.test_gunicorn import Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TOKEN = "integration-token"
sys.path.insert(0, str(ROOT / "monitoring"))
stack_module = pytest.importorskip("stack")


def require_binaries() -> None:
    missing = [b for b in ("prometheus", "promtool") if not shutil.which(b)]
    if not (shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")):
        missing.append("prometheus-alertmanager")
    if missing:
        if os.environ.get("RAREML_REQUIRE_MONITORING"):
            pytest.fail(f"RAREML_REQUIRE_MONITORING is set but {', '.join(missing)} is missing")
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install prometheus prometheus-alertmanager)")


def get(url: str, headers: dict | None = None) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
        return json.loads(response.read())


def query(prometheus: str, expr: str) -> list[dict]:
    answer = get(f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for(what: str, check, seconds: float, every: float = 2.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"not within {seconds} s: {what}")


def drift_alerts(prometheus: str) -> list[dict]:
    alerts = get(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] in ("RareMLDataDrift", "RareMLPredictionDrift")]


def simulate(port: int, artifacts: Path, scenario: str, seconds: int = 20) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "05_simulate.py"), "--url", f"http://127.0.0.1:{port}",
                           "--artifacts", str(artifacts), "--scenario", scenario, "--rate", "30", "--seconds",
                           str(seconds), "--feedback-delay", "2", "--shift", "3"],
                          capture_output=True, text=True, timeout=seconds + 60, check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["predict 200"] == 30 * seconds and summary["feedback 200"] == 30 * seconds, summary
    return summary


@pytest.fixture
def monitored(trained, tmp_path, monkeypatch):
    """API (2 gunicorn workers, webhook on) + Prometheus + Alertmanager, all on free local ports."""
    require_binaries()
    monkeypatch.setenv("RAREML_ALERT_TOKEN", TOKEN)
    api = Server(trained / "artifacts", tmp_path / "log.db", tmp_path / "api.log")
    stack = None
    try:
        api.wait_ready()
        stack = stack_module.start(tmp_path / "monitoring", api=f"127.0.0.1:{api.port}",
                                   prometheus_port=free_port(), alertmanager_port=free_port(), token=TOKEN)
        yield api, stack
    finally:
        stack_module.stop(tmp_path / "monitoring")
        api.stop()


def test_configs_and_rules_pass_promtool(tmp_path):
    require_binaries()
    prometheus_cfg, _ = stack_module.write_configs(tmp_path, "127.0.0.1:8000", 19090, 19093, TOKEN)
    for command in (["promtool", "check", "config", str(prometheus_cfg)],
                    ["promtool", "check", "rules", str(ROOT / "monitoring" / "alerts.yml")],
                    ["promtool", "test", "rules", str(ROOT / "monitoring" / "alerts_test.yml")]):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    amtool = shutil.which("amtool")
    if amtool:
        proc = subprocess.run([amtool, "check-config", str(tmp_path / "alertmanager.yml")], capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_covariate_drift_fires_the_alert_and_reaches_the_webhook(monitored, trained):
    api, stack = monitored
    simulate(api.port, trained / "artifacts", "covariate")
    psi = wait_for("rareml_feature_psi_max above 0.2 in Prometheus", lambda: [
        r for r in query(stack.prometheus, "rareml_feature_psi_max") if float(r["value"][1]) > 0.2], 30)
    assert float(psi[0]["value"][1]) > 0.2
    wait_for("RareMLDataDrift firing", lambda: [a for a in drift_alerts(stack.prometheus)
                                               if a["labels"]["alertname"] == "RareMLDataDrift"
                                               and a["state"] == "firing"], 90)
    recorded = wait_for("the webhook records RareMLDataDrift", lambda: [
        a for a in get(f"http://127.0.0.1:{api.port}/alerts", {"Authorization": f"Bearer {TOKEN}"})["alerts"]
        if a["alertname"] == "RareMLDataDrift" and a["status"] == "firing"], 60)
    assert recorded[0]["labels"]["retrain"] == "true"
    wait_for("rareml_alerts_received_total scraped", lambda: sum(
        float(r["value"][1]) for r in query(stack.prometheus, "rareml_alerts_received_total")) >= 1, 20)

    dashboard = json.loads((ROOT / "grafana_dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    empty = [e for e in exprs if not query(stack.prometheus, e)]
    assert not empty, f"panels without data: {empty}"


def test_no_drift_no_drift_alert(monitored, trained):
    api, stack = monitored
    simulate(api.port, trained / "artifacts", "none")
    wait_for("a full window scraped", lambda: [
        r for r in query(stack.prometheus, "rareml_window_predictions") if float(r["value"][1]) >= 600], 30)
    time.sleep(40)  # longer than the rule's `for: 30s`
    assert float(query(stack.prometheus, "rareml_feature_psi_max")[0]["value"][1]) < 0.2
    assert drift_alerts(stack.prometheus) == []
    assert get(f"http://127.0.0.1:{api.port}/alerts", {"Authorization": f"Bearer {TOKEN}"})["alerts"] == []
