"""One retraining (06_retrain.py), as `make retrain` runs it: labelled production rows reach the log
through the real API, the real stages train a challenger on them, the gate judges it on the newest
rows, and the champion alias moves only when the challenger is better. Real MLflow (a file store in
the test's folder), real XGBoost, a small budget."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rareml import registry
from rareml.features import to_records
from rareml.model import load_model
from rareml.store import Store
from tests.conftest import ROOT, copy_project, run_stage
from tests.integration.test_registry import aliases_in_mlflow

pytestmark = pytest.mark.integration
PRODUCTION_ROWS = 900


@pytest.fixture(scope="module")
def production(census_small) -> pd.DataFrame:
    """1995 rows of the full census data that the small slice (train and test) never held, with a
    new concept: from now on, the positives are the men over 45 who work at least 40 weeks a year."""
    used = pd.read_parquet(census_small.parent / "census_small.parquet").index
    full = pd.read_parquet(ROOT / "data" / "census_income_kdd.parquet")
    rows = full[(full["year"] == 95) & ~full.index.isin(used)].sample(PRODUCTION_ROWS, random_state=1)
    concept = (rows["sex"] == "Male") & (rows["age"] > 45) & (rows["weeks_worked_in_year"] >= 40)
    return rows.assign(income_gt_50k=concept.astype(int))


def seeded(trained: Path, tmp_path: Path, production: pd.DataFrame, invert_training_labels: bool = False) -> Path:
    """A copy of the trained project whose API has served the production rows, one /predict each,
    and received their labels; with `invert_training_labels`, all but the newest rows get the
    wrong label (a challenger made worse on purpose)."""
    work = tmp_path / "work"
    copy_project(trained, work)
    root = work / "artifacts"
    model = load_model(registry.serving_dir(root))
    client = importlib.import_module("04_serve").create_app(registry.serving_dir(root), root / "serving" /
                                                            "predictions.db", refresh=3600).test_client()
    records = to_records(production, model.schema)
    gate_from = len(records) - int(0.3 * len(records))
    for i, (record, label, year) in enumerate(zip(records, production["income_gt_50k"], production["year"])):
        record = record | {"year": int(year)}  # a column the pipeline ignores: accepted as sent
        answer = client.post("/predict", json=record)
        assert answer.status_code == 200, answer.get_json()
        wrong = invert_training_labels and i < gate_from
        feedback = {"prediction_id": answer.get_json()["prediction_id"], "label": int(1 - label if wrong else label)}
        assert client.post("/feedback", json=feedback).status_code == 200
    return work


def config_with(census_small: Path, tmp_path: Path, retrain: str) -> Path:
    path = tmp_path / "config.toml"
    text = census_small.read_text().replace('data = "census_small.parquet"',
                                            f'data = "{census_small.parent / "census_small.parquet"}"')
    path.write_text(text + "\n[retrain]\n" + retrain)
    return path


def retrain(work: Path, config: Path, *extra: str) -> dict:
    out = work / "outcome.json"
    run_stage("06_retrain.py", "--config", str(config), "--artifacts", str(work / "artifacts"), "--budget", "40",
              "--bootstrap", "300", "--outcome", str(out), *extra, cwd=work, timeout=900)
    return json.loads(out.read_text())


def test_a_better_challenger_passes_the_gate_and_becomes_the_champion(trained, census_small, production, tmp_path,
                                                                     monkeypatch):
    work = seeded(trained, tmp_path, production)
    root = work / "artifacts"
    champion = registry.version_of(root, "champion")
    config = config_with(census_small, tmp_path, "min_new_labels = 300\nproduction_weight = 5.0\n")
    outcome = retrain(work, config, "--alert", json.dumps({"alertname": "RareMLLivePerformanceDecay"}))
    assert outcome["outcome"] == "promoted", outcome
    new = outcome["challenger"]
    assert new != champion and registry.version_of(root, "champion") == new
    assert registry.version_of(root, "previous") == champion
    run = Path(outcome["run"])
    gate = json.loads((run / "gate.json").read_text())
    assert gate == json.loads((root / "gates" / f"{new}.json").read_text())
    assert gate["promote"] and not gate["reasons"] and gate["rows"] == int(np.ceil(0.3 * PRODUCTION_ROWS))
    assert gate["positives"] == int(production["income_gt_50k"].tail(gate["rows"]).sum())
    ap = gate["average_precision"]
    assert ap["difference"]["low"] > 0 and ap["challenger"]["value"] > ap["champion"]["value"]
    # the run trained on the original rows plus the older production rows, and tested on the gate set
    prepared = json.loads((run / "prepared.json").read_text())
    assert prepared["rows"]["test"] == gate["rows"]
    assert prepared["rows"]["train"] == 3000 + PRODUCTION_ROWS - gate["rows"]
    train = pd.read_parquet(run / "train.parquet")
    assert sorted(train["_weight"].unique().tolist()) == [1.0, 5.0]
    manifest = load_model(root / "models" / new).manifest
    assert manifest["lineage"]["parent"] == champion
    card = importlib.import_module("04_serve").create_app(registry.serving_dir(root), tmp_path / "other.db",
                                                          refresh=3600).test_client().get("/model").get_json()
    assert card["model_version"] == new and card["gate"] == gate and card["lineage"]["parent"] == champion
    # MLflow: the run tagged with the alert, both versions with the gate's decision, the aliases moved
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=str(work / "mlruns"))
    versions = {v.tags["model_version"]: v for v in client.search_model_versions("name='census-small'")}
    assert versions[new].tags["retrain.alert"] == "RareMLLivePerformanceDecay"
    assert versions[new].tags["gate.decision"] == "promoted" and versions[new].tags["gate.role"] == "challenger"
    assert versions[champion].tags["gate.role"] == "champion"
    assert aliases_in_mlflow(work)["champion"] == str(versions[new].version)


def test_a_worse_challenger_is_rejected_and_nothing_changes(trained, census_small, production, tmp_path):
    work = seeded(trained, tmp_path, production, invert_training_labels=True)
    root = work / "artifacts"
    champion = registry.version_of(root, "champion")
    config = config_with(census_small, tmp_path, "min_new_labels = 300\nproduction_weight = 5.0\n")
    outcome = retrain(work, config, "--no-mlflow")
    assert outcome["outcome"] == "rejected", outcome
    assert registry.version_of(root, "champion") == champion and registry.version_of(root, "previous") is None
    assert registry.version_of(root, "challenger") == outcome["challenger"]  # it keeps its alias
    assert any("average precision not better" in r for r in outcome["reasons"])


def test_too_few_labels_train_nothing_and_say_why(trained, census_small, production, tmp_path):
    work = seeded(trained, tmp_path, production.head(120))
    config = config_with(census_small, tmp_path, "")
    outcome = retrain(work, config, "--no-mlflow")
    assert outcome["outcome"] == "not_enough_labels"
    assert outcome["reason"] == "120 labelled production rows, fewer than min_new_labels = 200"
    assert not (work / "artifacts" / "runs").exists()
    assert Store(work / "artifacts" / "serving" / "predictions.db", 1).counts()["feedback"] == 120


def test_the_watcher_runs_each_queued_alert_once_and_records_the_outcome(trained, census_small, production, tmp_path):
    work = seeded(trained, tmp_path, production.head(50))
    db = work / "artifacts" / "serving" / "predictions.db"
    store = Store(db, 1)
    fire = {"status": "firing", "labels": {"alertname": "RareMLDataDrift", "retrain": "true"}, "fingerprint": "f1",
            "startsAt": "2026-12-02T00:00:00Z"}
    assert store.add_alerts([fire, fire | {"fingerprint": "f2"}]) == 2
    config = config_with(census_small, tmp_path, "cooldown_seconds = 0\n")
    run_stage("06_retrain.py", "--config", str(config), "--artifacts", str(work / "artifacts"), "--watch",
              "--poll", "0.2", "--max-polls", "3", "--no-mlflow", cwd=work, timeout=300)
    retrains = store.retrains()
    assert [r["outcome"] for r in retrains] == ["not_enough_labels"] * 2  # two alerts, one retraining
    assert retrains[0]["detail"]["reason"].startswith("50 labelled production rows, fewer than min_new_labels")
    assert retrains[0]["started"] == retrains[1]["started"] and retrains[0]["attempts"] == 1
    assert retrains[0]["detail"]["alert"] == {"alertname": "RareMLDataDrift", "alerts": [
        "f1@2026-12-02T00:00:00Z", "f2@2026-12-02T00:00:00Z"]}


def test_a_crashed_or_overrun_retraining_is_recorded_failed_and_the_watcher_carries_on(trained, census_small,
                                                                                     production, tmp_path):
    """The data file gone (the retraining fails with the reason), then a retraining stopped past
    its budget: both recorded as failed, the champion as it was, and the watcher goes on."""
    work = seeded(trained, tmp_path, production)
    root = work / "artifacts"
    champion = registry.version_of(root, "champion")
    store = Store(root / "serving" / "predictions.db", 1)
    alert = {"status": "firing", "labels": {"alertname": "RareMLDataDrift", "retrain": "true"}, "fingerprint": "f"}
    config = config_with(census_small, tmp_path, "min_new_labels = 300\ncooldown_seconds = 0\n")
    gone = tmp_path / "gone.toml"
    gone.write_text(config.read_text().replace(str(census_small.parent / "census_small.parquet"), str(tmp_path / "x.parquet")))
    watch = ["--artifacts", str(root), "--watch", "--poll", "0.2", "--max-polls", "2", "--no-mlflow"]
    assert store.add_alerts([alert | {"startsAt": "t0"}]) == 1
    run_stage("06_retrain.py", "--config", str(gone), *watch, cwd=work, timeout=300)
    assert store.add_alerts([alert | {"startsAt": "t1"}]) == 1
    run_stage("06_retrain.py", "--config", str(config), *watch, "--budget", "10", "--overrun", "-9.5", cwd=work,
              timeout=300)
    first, second = store.retrains()[::-1]
    assert first["outcome"] == second["outcome"] == "failed"
    assert first["detail"]["reason"] == f"data file not found: {tmp_path / 'x.parquet'}"
    assert second["detail"]["reason"] == "ran past its budget of 10 s: stopped after 0.5 s"
    assert registry.version_of(root, "champion") == champion and registry.version_of(root, "previous") is None
