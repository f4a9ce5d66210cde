"""The MLflow UI over the session's runs, as `make mlflow-ui` serves it: `mlflow ui` on 127.0.0.1 and a
free port over the trained fixture's ./mlruns, and Debian's chromium driven by Playwright. The link
03_serialize.py prints opens on the training runs (not MLflow 3.17's GenAI onboarding, where the plain
experiment page lands in a fresh browser), and the tuning run shows its two datasets with their digests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from rareml.artifacts import read_json
from rareml.processes import free_port, stop_group, wait_http
from rareml.tracking import KIND, KIND_TAG, ui_url
from tests.conftest import ROOT, chromium_page, require_chromium

pytestmark = [pytest.mark.integration, pytest.mark.browser]
SHOTS = Path(os.environ.get("RAREML_TEST_ARTIFACTS", ROOT / "test-artifacts"))
ONBOARDING = "Start tracing your LLM application"


@pytest.fixture
def mlflow_ui(trained, tmp_path) -> Iterator[str]:
    """`mlflow ui` on the trained fixture's runs, in its own process group, stopped by PID."""
    require_chromium()  # before starting anything
    port, log = free_port(), tmp_path / "mlflow-ui.log"
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", str(trained / "mlruns")]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = os.environ | {"MLFLOW_ALLOW_FILE_STORE": "true"}
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            command, cwd=trained, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, seconds=90, log=log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc)


def api(base: str, path: str, **query: str) -> dict:
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}", timeout=30) as r:
        return json.load(r)


def test_the_printed_link_opens_on_the_training_runs_with_their_datasets(trained, mlflow_ui):
    artifacts = trained / "artifacts"
    printed, prepared = read_json(artifacts / "serialized.json")["mlflow"], read_json(artifacts / "prepared.json")
    experiment = api(mlflow_ui, "experiments/get-by-name", experiment_name="census-small")["experiment"]
    assert {t["key"]: t["value"] for t in experiment["tags"]}[KIND_TAG] == KIND
    assert printed["ui_url"] == ui_url(experiment["experiment_id"])
    parent = api(mlflow_ui, "runs/get", run_id=read_json(artifacts / "tuned.json")["mlflow"]["parent_run_id"])
    name = parent["run"]["info"]["run_name"]
    assert re.fullmatch(r"census-small tune \d{4}-\d\d-\d\d \d\d:\d\d", name)
    shown = {part: f"census-small-{part} ({prepared['fingerprint'][part]})" for part in ("train", "test")}
    with chromium_page(1600) as page:
        page.goto(ui_url(experiment["experiment_id"], mlflow_ui), wait_until="domcontentloaded", timeout=30000)
        page.get_by_text(name, exact=True).wait_for(timeout=60000)
        for text in shown.values():  # only the tuning run has datasets: its trials have none
            page.get_by_text(text, exact=True).first.wait_for(timeout=20000)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "mlflow-runs.png"))
        url, onboarding = page.url, page.get_by_text(ONBOARDING).count()
    assert "/runs" in url and "workflowType=machine_learning" in url, url
    assert onboarding == 0
