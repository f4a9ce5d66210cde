"""Several model families through the real stages: selection follows the data (the linear family
on data made linear, XGBoost on data with interactions), the time budget is shared as documented,
and a model of each kind serves through the API."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rareml.model import load_model
from tests.conftest import run_stage

pytestmark = pytest.mark.slow

CONFIG = """
name = "{name}"
data = "table.csv"
target = "y"
positive = 1
cv_folds = 3
cv_repeats = 1
[model]
families = {families}
"""


def write_table(folder: Path, kind: str, n: int = 4000, seed: int = 0, families: str = '["linear", "xgboost"]') -> Path:
    """A table whose signal is additive in its features ("linear"), or lives only in interactions
    (the sign of a product, a category that flips a number's effect), beside noise columns."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    group = rng.choice(["u", "v", "w"], n)
    if kind == "linear":
        logit = -2.6 + x[:, :4] @ np.array([1.0, -0.8, 0.6, 0.5]) + np.where(group == "u", 0.7, 0.0)
    else:
        logit = -2.2 + 3.0 * np.sign(x[:, 0] * x[:, 1]) + np.where(group == "u", 2.0, -2.0) * x[:, 2]
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(6)]).assign(group=group, y=y)
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / "table.csv", index=False)
    (folder / "config.toml").write_text(CONFIG.format(name=f"families-{kind}", families=families))
    return folder / "config.toml"


def train(config: Path, artifacts: Path, *tune_args: str) -> dict:
    args = ["--config", str(config), "--artifacts", str(artifacts)]
    run_stage("01_prepare.py", *args, cwd=artifacts.parent)
    run_stage("02_tune.py", *args, *tune_args, cwd=artifacts.parent)
    run_stage("03_serialize.py", *args, "--bootstrap", "100", "--no-mlflow", cwd=artifacts.parent)
    return json.loads((artifacts / "model" / "manifest.json").read_text())


@pytest.mark.parametrize("kind, winner", [("linear", "linear"), ("interactions", "xgboost")])
def test_selection_prefers_the_family_the_data_calls_for(tmp_path, kind, winner):
    config = write_table(tmp_path, kind)
    manifest = train(config, tmp_path / "artifacts", "--n-trials", "4", "--time-budget", "300")
    selection = manifest["selection"]
    families = selection["families"]
    loser = "xgboost" if winner == "linear" else "linear"
    assert families[winner]["oof_average_precision"] > families[loser]["oof_average_precision"]
    assert selection["weights"].get(winner, 0) >= 0.5
    assert selection["oof_average_precision"] >= families[winner]["oof_average_precision"]
    if kind == "interactions":  # no additive model can see a sign of a product
        assert families["linear"]["oof_average_precision"] < 0.8 * families["xgboost"]["oof_average_precision"]
    for entry in families.values():
        low, high = entry["oof_average_precision_ci"]
        assert low <= entry["oof_average_precision"] <= high
        assert "test_average_precision" in entry
    model = load_model(tmp_path / "artifacts" / "model")
    assert {m.family: m.weight for m in model.members} == selection["weights"]


def test_the_budget_is_shared_between_families_in_turn(tmp_path):
    """No trial cap: the linear family stops at its share (or its max_trials), XGBoost starts after it
    and stops in time for the final stage; both complete trials."""
    config = write_table(tmp_path, "linear", n=3000)
    budget = 50
    run_stage("01_prepare.py", "--config", str(config), "--artifacts", str(tmp_path / "a"), cwd=tmp_path)
    run_stage("02_tune.py", "--config", str(config), "--artifacts", str(tmp_path / "a"), "--time-budget", str(budget),
              cwd=tmp_path)
    tuned = json.loads((tmp_path / "a" / "tuned.json").read_text())
    linear, trees = tuned["families"]["linear"], tuned["families"]["xgboost"]
    assert list(tuned["families"]) == ["linear", "xgboost"]  # cheapest first
    assert linear["trials"].get("COMPLETE", 0) >= 1 and trees["trials"].get("COMPLETE", 0) >= 1
    # a fold fit can run past a deadline; nothing else may (the next fold does not start)
    slack = 5.0
    assert linear["time"]["ended_at"] <= linear["time"]["share_ends_at"] + slack or \
        sum(linear["trials"].values()) == linear["search"]["max_trials"]
    assert trees["time"]["started_at"] >= linear["time"]["ended_at"]
    search_end = tuned["budget"]["ends_at"] - tuned["budget"]["reserved_for_final_stage_s"]
    assert trees["time"]["ended_at"] <= search_end + slack
    # the first family's share is half of the search time there was when it started
    assert linear["time"]["share_ends_at"] < tuned["budget"]["ends_at"] - budget / 4


def test_a_config_naming_an_unknown_family_is_one_clear_line(tmp_path):
    config = write_table(tmp_path, "linear", n=500, families='["linear", "forest"]')
    proc = run_stage("01_prepare.py", "--config", str(config), "--artifacts", str(tmp_path / "a"), cwd=tmp_path,
                     check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "[model]: families must name each of linear, xgboost at most once" in proc.stderr


def test_refit_on_all_serves_a_model_refitted_on_train_and_test(tmp_path):
    """The same tuning serialized twice: the second time refitted on every labelled row for serving;
    its metrics are the train-only fit's (the same numbers), its predictions are not, and the
    manifest says so."""
    import shutil

    config = write_table(tmp_path, "linear", n=2000)
    first = train(config, tmp_path / "artifacts", "--n-trials", "2", "--time-budget", "300")
    assert first["refit_on_all"] is None
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "artifacts", again, symlinks=True,
                    ignore=shutil.ignore_patterns("model", "models", "reports", "champion", "challenger", "previous"))
    config_all = tmp_path / "config-all.toml"
    config_all.write_text(config.read_text().replace("[model]", "[model]\nrefit_on_all = true"))
    run_stage("03_serialize.py", "--config", str(config_all), "--artifacts", str(again), "--bootstrap", "100",
              "--no-mlflow", cwd=tmp_path)
    second = json.loads((again / "model" / "manifest.json").read_text())
    prepared = json.loads((again / "prepared.json").read_text())
    assert second["refit_on_all"]["rows"] == prepared["rows"]["train"] + prepared["rows"]["test"]
    assert second["metrics"]["test"] == first["metrics"]["test"] and second["threshold"] == first["threshold"]
    assert second["model_version"] != first["model_version"]
    test = pd.read_parquet(again / "test.parquet")
    served, train_only = load_model(again / "model"), load_model(tmp_path / "artifacts" / "model")
    assert not np.array_equal(served.predict_proba(test), train_only.predict_proba(test))


def test_a_retraining_searches_the_champions_families_from_their_configurations(tmp_path):
    """02_tune --warm-start (06_retrain's) searches only the families the starting model has, each
    from its own configuration first; without --warm-start, the config's families."""
    config = write_table(tmp_path, "interactions", n=2000)
    first = train(config, tmp_path / "artifacts", "--n-trials", "2", "--time-budget", "300")
    run_stage("02_tune.py", "--config", str(config), "--artifacts", str(tmp_path / "artifacts"), "--n-trials", "1",
              "--time-budget", "300", "--warm-start", str(tmp_path / "artifacts" / "model"), cwd=tmp_path)
    tuned = json.loads((tmp_path / "artifacts" / "tuned.json").read_text())
    assert list(tuned["families"]) == sorted(first["selection"]["weights"], key=["linear", "xgboost"].index)
    for member in first["members"]:
        assert tuned["families"][member["family"]]["search"]["starts"][0] == member["choice"]
