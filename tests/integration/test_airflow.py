"""Apache Airflow 3 over the project's DAGs (dags/): the DAGs folder loads, each DAG has its tasks in
order; dag.test() of rareml_train on credit_data and of rareml_retrain on a seeded prediction log;
and a real Airflow (API server, scheduler, DAG processor, as `make airflow` starts them) whose
rareml_retrain run is started by an alert posted to the API's webhook.

Airflow runs in child processes: it reads its settings and sets up its logging when imported,
kept out of pytest's process. Real MLflow (a file store in the test's folder), real XGBoost."""
from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rareml import registry
from rareml.artifacts import read_json
from rareml.orchestrator import Airflow
from rareml.processes import free_port
from rareml.store import Store, alert_key
from tests.api.conftest import sample, scrape
from tests.conftest import ROOT, require_chromium
from tests.integration.test_registry import aliases_in_mlflow
from tests.integration.test_retrain import config_with, production, seeded  # noqa: F401  (production: a fixture)

pytestmark = pytest.mark.integration
sys.path.insert(0, str(ROOT / "orchestration"))
airflow_stack = importlib.import_module("airflow_stack")
screenshot = importlib.import_module("screenshot")
TOKEN = "airflow-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict:
    """An AIRFLOW_HOME of its own (metadata migrated) and MLflow in the test's folder."""
    if not (Path(sys.executable).parent / "airflow").exists():
        pytest.fail("Airflow is not installed in this venv: make airflow-setup (make test does it)")
    home = tmp_path_factory.mktemp("airflow-home")
    env = airflow_stack.environment(home, free_port()) | {"MLFLOW_TRACKING_URI": str(home / "mlruns")}
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=600)
    return env


def child(env: dict, *args: str, timeout: int = 900) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "integration" / "airflow_child.py"), *args],
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)
    found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and found, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(found[-1][len("RESULT "):])


def chain(tasks: dict) -> list[str]:
    """The tasks in order, when each has exactly one task downstream (the last none)."""
    first = set(tasks) - {d for t in tasks.values() for d in t["downstream"]}
    assert len(first) == 1, tasks
    order = [first.pop()]
    while tasks[order[-1]]["downstream"]:
        assert len(tasks[order[-1]]["downstream"]) == 1, tasks
        order.append(tasks[order[-1]]["downstream"][0])
    assert len(order) == len(tasks), tasks
    return order


def makefile_default(name: str) -> str:
    return re.search(rf"^{name} \?= (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1).strip()


def test_the_dags_folder_loads_and_each_dag_has_its_tasks_in_order_with_the_makefiles_defaults(airflow_env):
    got = child(airflow_env, "dags", timeout=300)
    assert got["import_errors"] == {}
    train, retrain = got["dags"]["rareml_train"], got["dags"]["rareml_retrain"]
    assert chain(train["tasks"]) == ["prepare", "tune", "serialize", "space", "report"]
    assert chain(retrain["tasks"]) == ["snapshot", "train", "gate", "promote", "record"]
    assert retrain["tasks"]["record"]["trigger_rule"].endswith("ALL_DONE")  # it records failures too
    for dag in (train, retrain):
        assert dag["schedule"] == "NullTimetable"  # started by hand, by the API or by REST: never on a clock
        assert all(t["timeout"] for t in dag["tasks"].values()), dag["tasks"]
    assert train["tasks"]["tune"]["retries"] == 0 and train["tasks"]["space"]["retries"] >= 1
    assert retrain["tasks"]["train"]["retries"] == 0 and retrain["tasks"]["promote"]["retries"] >= 1
    assert (train["params"]["config"], train["params"]["artifacts"], str(train["params"]["budget"]),
            train["params"]["report_monitoring"]) == (makefile_default("CONFIG"), makefile_default("ARTIFACTS"),
                                                      makefile_default("BUDGET"), makefile_default("MONITORING"))
    assert (retrain["params"]["config"], retrain["params"]["artifacts"]) == (makefile_default("CONFIG"),
                                                                           makefile_default("ARTIFACTS"))


def test_dag_test_of_rareml_train_on_credit_data_registers_a_champion_and_builds_the_space(airflow_env, tmp_path):
    artifacts, space = tmp_path / "credit", tmp_path / "space"
    conf = {"config": str(ROOT / "configs" / "credit_data.toml"), "artifacts": str(artifacts), "budget": 45,
            "space_dir": str(space), "report_monitoring": "skip"}
    got = child(airflow_env, "test", "rareml_train", json.dumps(conf))
    assert got == {"state": "success",
                   "tasks": dict.fromkeys(["prepare", "tune", "serialize", "space", "report"], "success")}
    version = read_json(artifacts / "serialized.json")["model_version"]
    assert registry.version_of(artifacts, "champion") == registry.version_of(artifacts, "challenger") == version
    assert (artifacts / "models" / version / "manifest.json").is_file()
    assert (space / "app.py").is_file() and (space / "artifacts" / "model" / "examples.json").is_file()
    page = (artifacts / "report" / "report.html").read_text()  # the report task: of this model
    assert f'name="model-version" content="{version}"' in page and (artifacts / "report" / "slides.html").is_file()
    assert aliases_in_mlflow(Path(airflow_env["MLFLOW_TRACKING_URI"]).parent, "credit-data").get("champion")


def test_dag_test_of_rareml_retrain_gates_promotes_and_records_the_outcome(trained, census_small, production,  # noqa: F811
                                                                        tmp_path, airflow_env):
    work = seeded(trained, tmp_path, production)
    root, db = work / "artifacts", work / "artifacts" / "serving" / "predictions.db"
    champion = registry.version_of(root, "champion")
    config = config_with(census_small, tmp_path, "min_new_labels = 300\nproduction_weight = 5.0\n")
    fired = {"status": "firing", "labels": {"alertname": "RareMLLivePerformanceDecay", "retrain": "true"},
             "startsAt": "2026-12-01T10:00:00Z", "fingerprint": "f00d"}
    Store(db, 1).add_alerts([fired])
    conf = {"config": str(config), "artifacts": str(root), "db": str(db), "budget": 40,
            "alert": {"alertname": "RareMLLivePerformanceDecay"}, "alert_keys": [alert_key(fired)]}
    got = child(airflow_env, "test", "rareml_retrain", json.dumps(conf))
    assert got == {"state": "success", "tasks": dict.fromkeys(["snapshot", "train", "gate", "promote", "record"],
                                                              "success")}
    [run] = [p for p in (root / "runs").iterdir() if p.is_dir()]
    decision = read_json(run / "gate.json")
    assert decision["champion"] == champion and decision["alert"] == {"alertname": "RareMLLivePerformanceDecay"}
    assert decision["promote"], decision["reasons"]  # the concept changed: the challenger learnt it
    assert registry.version_of(root, "champion") == decision["challenger"] != champion
    assert registry.version_of(root, "previous") == champion
    [recorded] = Store(db, 1).retrains()
    assert recorded["outcome"] == "promoted" and recorded["detail"]["challenger"] == decision["challenger"]
    assert recorded["detail"]["dag_run_id"]


def test_an_alert_starts_one_airflow_run_that_retrains_and_a_repeat_or_an_outage_loses_nothing(
        trained, census_small, production, tmp_path, monkeypatch, airflow_env):  # noqa: F811
    work = seeded(trained, tmp_path, production)
    root, db = work / "artifacts", work / "artifacts" / "serving" / "predictions.db"
    champion = registry.version_of(root, "champion")
    config = config_with(census_small, tmp_path, "min_new_labels = 300\nproduction_weight = 5.0\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "mlruns"))
    home = tmp_path / "airflow"
    airflow = airflow_stack.start(home, free_port(), password="test-pw", seconds=240)
    try:
        client_of = Airflow(airflow.url, airflow.username, airflow.password, timeout=5.0,
                            conf={"config": str(config), "artifacts": str(root), "db": str(db), "budget": 40})
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
        api = importlib.import_module("04_serve").create_app(registry.serving_dir(root), db, refresh=0,
                                                             alert_token=TOKEN, orchestrator=client_of).test_client()
        fired = {"status": "firing", "labels": {"alertname": "RareMLLivePerformanceDecay", "retrain": "true"},
                 "annotations": {}, "startsAt": "2026-12-01T10:00:00Z", "fingerprint": "beef"}
        body = {"version": "4", "groupKey": '{}:{alertname="RareMLLivePerformanceDecay"}', "alerts": [fired]}
        answer = api.post("/alerts", json=body, headers=AUTH).get_json()
        assert answer["retrains_queued"] == 1 and answer["airflow"]["result"] == "created", answer
        run_id = answer["airflow"]["dag_run_id"]
        deadline, state = time.monotonic() + 900, None
        while time.monotonic() < deadline and state not in ("success", "failed"):
            time.sleep(3)
            state = client_of.run_state(run_id)
        assert state == "success", (home / "scheduler.log").read_text()[-3000:]
        [recorded] = api.get("/alerts", headers=AUTH).get_json()["retrains"]
        assert recorded["outcome"] == "promoted" and recorded["detail"]["dag_run_id"] == run_id
        assert registry.version_of(root, "champion") == recorded["detail"]["challenger"] != champion
        # the run as a person sees it: the Airflow UI in headless Chromium, logged in
        require_chromium()
        page = screenshot.shoot_run(airflow.url, airflow.username, airflow.password, "rareml_retrain", run_id,
                                    tmp_path / "airflow-retrain-run.png")
        assert run_id in page and page.count("Success") >= 6, page[:2000]  # the run and its five tasks
        assert all(task in page for task in ("snapshot", "train", "gate", "promote", "record"))
        # the same alert again (Alertmanager repeats): no second run, by the log and by Airflow's run id
        again = api.post("/alerts", json=body, headers=AUTH).get_json()
        assert again["retrains_queued"] == 0 and again["airflow"] == {"result": "exists", "dag_run_id": run_id}
        assert client_of.trigger(run_id, {}) == "exists"  # Airflow's 409
        assert airflow.client().get("/api/v2/dags/rareml_retrain/dagRuns")["total_entries"] == 1
    finally:
        airflow_stack.stop(home)
    # Airflow gone: a new alert is queued for the embedded watcher, and the failure counted
    later = {**fired, "startsAt": "2026-12-01T12:00:00Z"}
    answer = api.post("/alerts", json={**body, "alerts": [later]}, headers=AUTH).get_json()
    assert answer["retrains_queued"] == 1 and answer["airflow"]["result"] == "failed", answer
    queued = [r for r in api.get("/alerts", headers=AUTH).get_json()["retrains"] if r["outcome"] is None]
    assert [(r["alert"], r["started"]) for r in queued] == [(alert_key(later), None)]
    metrics = scrape(api)
    assert sample(metrics, "rareml_orchestrator_triggers_total", result="failed") == 1
    assert sample(metrics, "rareml_orchestrator_triggers_total", result="created") == 1
