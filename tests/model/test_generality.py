"""The shipped configs of two other real datasets run end to end with nothing but their config;
the same seed gives the same search."""
import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_stage

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("config", ["credit_data.toml", "resume_callback.toml"])
def test_other_datasets_train_from_their_config_alone(tmp_path, config):
    args = ["--config", str(ROOT / "configs" / config), "--artifacts", str(tmp_path / "a")]
    run_stage("01_prepare.py", *args, cwd=tmp_path)
    run_stage("02_tune.py", *args, "--n-trials", "3", "--time-budget", "120", cwd=tmp_path)
    run_stage("03_serialize.py", *args, "--bootstrap", "100", "--no-mlflow", cwd=tmp_path)
    manifest = json.loads((tmp_path / "a" / "model" / "manifest.json").read_text())
    test = manifest["metrics"]["test"]
    assert test["average_precision"] > 1.2 * manifest["metrics"]["no_skill"]["average_precision"]
    assert manifest["threshold"]["metric"] in ("cost", "fbeta")


def tune(census_small: Path, folder: Path) -> dict:
    args = ["--config", str(census_small), "--artifacts", str(folder)]
    if not (folder / "prepared.json").exists():
        run_stage("01_prepare.py", *args, cwd=folder.parent)
    run_stage("02_tune.py", *args, "--n-trials", "3", "--time-budget", "600", cwd=folder.parent)
    return json.loads((folder / "tuned.json").read_text())


def test_same_seed_same_result(census_small, tmp_path):
    first, second = tune(census_small, tmp_path / "a"), tune(census_small, tmp_path / "b")
    assert first["families"].keys() == second["families"].keys() and first["best_family"] == second["best_family"]
    for name, entry in first["families"].items():
        for key in ("choice", "iterations", "fold_iterations", "cv", "best_trial", "ensemble", "oof_average_precision"):
            assert entry[key] == second["families"][name][key], (name, key)
