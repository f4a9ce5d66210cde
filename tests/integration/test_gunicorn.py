"""The API as users run it: `04_serve.py` under real gunicorn with 2 workers, on 127.0.0.1.

A bounded load of good and bad requests from several threads; nothing fails unexpectedly, and
the Prometheus counters (added up over the workers) equal what was sent; labels survive a restart;
a corrupt model keeps the server from starting."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rareml.features import to_records
from rareml.model import load_model
from rareml.processes import free_port, stop_group, wait_http
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def call(port: int, method: str, path: str, body: bytes | None = None,
         content_type: str = "application/json") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type} if body is not None else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Server:
    """`python 04_serve.py` in its own process group, stopped by PID."""

    def __init__(self, artifacts: Path, db: Path, log: Path, *extra: str, env: dict | None = None):
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "04_serve.py"), "--artifacts", str(artifacts), "--port", str(self.port),
             "--workers", "2", "--db", str(db), "--refresh", "0", *extra], cwd=artifacts.parent,
            stdout=subprocess.DEVNULL, stderr=open(log, "ab"), start_new_session=True,  # noqa: SIM115
            env=os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(db.parent / f"metrics-{self.port}")} | (env or {}))

    def workers(self) -> list[int]:
        """The PIDs of the master's worker processes."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(pid) for pid in children]

    def wait_ready(self, seconds: float = 60) -> None:
        wait_http(f"http://127.0.0.1:{self.port}/ready", self.proc, seconds, self.log)

    def stop(self) -> None:
        stop_group(self.proc)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    status, body = call(port, "GET", "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and labels.items() <= dict(lab).items())


@pytest.fixture()
def served(trained, tmp_path):
    servers = []

    def start() -> Server:
        server = Server(trained / "artifacts", tmp_path / "log.db", tmp_path / "server.log")
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


BAD_BODIES = [(b"", "application/json"), (b"{", "application/json"), (b"[1, 2]", "application/json"),
              (b'{"age": NaN}', "application/json"), (b"{}", "text/plain"), (b'"just a string"', "application/json")]


def test_load_counts_and_restart(served, trained):
    model = load_model(trained / "artifacts" / "model")
    test = pd.read_parquet(trained / "artifacts" / "test.parquet")
    records = to_records(test.head(1500), model.schema)
    server = served()
    port = server.port
    jobs = [("POST", "/predict", json.dumps(r).encode(), "application/json") for r in records]
    jobs += [("POST", "/predict", body, ctype) for body, ctype in BAD_BODIES * 50]
    jobs += [("POST", "/predict/batch", json.dumps({"records": records[i:i + 100]}).encode(), "application/json")
             for i in range(0, 1000, 100)]
    jobs += [("GET", "/health", None, "")] * 200
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: call(port, *job), jobs))
    statuses = Counter(status for status, _ in results)
    assert not [s for s in statuses if s >= 500], statuses
    good = [json.loads(body) for (status, body), job in zip(results, jobs) if job[1] == "/predict" and status == 200]
    assert len(good) == len(records)
    assert statuses[200] == len(records) + 10 + 200 and sum(v for s, v in statuses.items() if 400 <= s < 500) == 300

    labels = test["_label"].to_numpy()[:400]
    sent = [(p["prediction_id"], int(y)) for p, y in zip(good[:400], labels)]
    with ThreadPoolExecutor(8) as pool:
        feedback = list(pool.map(lambda item: call(port, "POST", "/feedback", json.dumps(
            {"prediction_id": item[0], "label": item[1]}).encode()), sent))
    assert {status for status, _ in feedback} == {200}

    m = scrape(port)
    assert total(m, "rareml_requests_total", endpoint="/predict", status="200") == len(records)
    assert total(m, "rareml_requests_total", endpoint="/predict/batch", status="200") == 10
    assert total(m, "rareml_requests_total", endpoint="/health", status="200") == 200
    assert total(m, "rareml_rejected_inputs_total") == 300
    assert total(m, "rareml_predictions_total") == len(records) + 1000
    assert total(m, "rareml_predicted_probability_count") == len(records) + 1000
    assert total(m, "rareml_feedback_total") == 400
    assert total(m, "rareml_window_labeled") == 400
    assert total(m, "rareml_window_predictions") == 1000  # the default window
    assert 0 <= total(m, "rareml_live_metric", metric="recall") <= 1
    assert total(m, "rareml_feature_psi_max") < 0.25  # test rows of the same data: no drift

    server.stop()
    server = served()  # same prediction log: the labels are still there, counters start again
    again = call(server.port, "POST", "/feedback", json.dumps({"prediction_id": sent[0][0], "label": 1}).encode())
    assert again[0] == 409
    m = scrape(server.port)
    assert total(m, "rareml_window_labeled") == 400
    assert total(m, "rareml_feedback_total") == 0


def test_refuses_to_start_on_a_corrupt_model(trained, tmp_path):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(trained / "artifacts" / "model", artifacts / "model")
    member = json.loads((artifacts / "model" / "manifest.json").read_text())["members"][0]["files"][0]
    with open(artifacts / "model" / member, "ab") as f:
        f.write(b"tampered")
    proc = subprocess.run([sys.executable, str(ROOT / "04_serve.py"), "--artifacts", str(artifacts), "--port",
                           str(free_port())], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert member in proc.stderr and "checksum" in proc.stderr and "Traceback" not in proc.stderr
