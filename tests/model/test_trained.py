"""Behaviour of a model trained by the real stages on a slice of the census data."""
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from rareml import metrics
from rareml.data import LABEL
from rareml.errors import RareMLError
from rareml.features import to_records
from rareml.model import content_version, load_model, manifest_sha256, verify_model_dir
from tests.conftest import run_stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(trained) -> Path:
    return trained / "artifacts" / "model"


@pytest.fixture(scope="module")
def test_split(trained) -> pd.DataFrame:
    return pd.read_parquet(trained / "artifacts" / "test.parquet")


@pytest.fixture(scope="module")
def client(trained):
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    mlflow.set_tracking_uri(str(trained / "mlruns"))
    return mlflow.MlflowClient()


def test_model_folder_holds_no_pickle(model_dir):
    manifest = json.loads((model_dir / "manifest.json").read_text())
    member_files = [name for m in manifest["members"] for name in m["files"]]
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(["calibrator.json", "examples.json", "manifest.json",
                                                                   *member_files])
    for path in model_dir.iterdir():
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{path.name} looks like a pickle or a zip (torch.save)"
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".ubj":
            assert head[:1] == b"{"  # UBJSON object, XGBoost's own format


def test_manifest_carries_what_serving_and_monitoring_need(model_dir):
    manifest = json.loads((model_dir / "manifest.json").read_text())
    for key in ("average_precision", "roc_auc", "brier"):
        low, high = manifest["metrics"]["test_ci"][key]
        assert low <= manifest["metrics"]["test"][key] <= high
    assert 0 < manifest["threshold"]["threshold"] < 1 and manifest["threshold"]["metric"] == "f1"
    assert {f["name"] for f in manifest["schema"]["features"]} == set(manifest["reference"]) - {"__score__"}
    assert set(manifest["metrics"]["fairness"]) == {"sex", "race"}
    assert manifest["data"]["fingerprint"]["data_file_sha256"]
    members = manifest["members"]
    assert all(manifest["versions"].get(m["family"]) or m["family"] == "linear" for m in members)
    assert set(manifest["files"]) == {"calibrator.json", "examples.json", *(f for m in members for f in m["files"])}
    assert sum(m["weight"] for m in members) == pytest.approx(1.0) and all(m["weight"] > 0 for m in members)
    assert manifest["selection"]["weights"] == {m["family"]: m["weight"] for m in members}


def test_the_booster_holds_the_trees_of_every_trial_it_averages(trained, model_dir):
    tuned = json.loads((trained / "artifacts" / "tuned.json").read_text())
    entry = tuned["families"]["xgboost"]
    members = entry["ensemble"]
    assert members[0]["trial"] == entry["best_trial"] and 1 <= len(members) <= 5
    booster = xgboost_member(model_dir).booster
    assert booster.num_boosted_rounds() == sum(m["iterations"] for m in members)
    oof = pd.read_parquet(trained / "artifacts" / "oof.parquet")
    for name, searched in tuned["families"].items():
        assert metrics.average_precision(oof[LABEL].to_numpy(), oof[name].to_numpy()) == \
            pytest.approx(searched["oof_average_precision"])


def xgboost_member(model_dir: Path):
    """The trained model's XGBoost member (alone or in a blend), as it serves; the XGBoost family
    is always searched, and its fit is refitted even when the blend leaves it out."""
    model = load_model(model_dir)
    found = [m.scorer for m in model.members if m.family == "xgboost"]
    if found:
        return found[0]
    from rareml.families import Context
    from rareml.families.xgboost import FAMILY
    from rareml.features import to_frame

    artifacts = model_dir.parent
    tuned = json.loads((artifacts / "tuned.json").read_text())
    train = pd.read_parquet(artifacts / "train.parquet")
    fitted = FAMILY.refit(tuned["families"]["xgboost"]["ensemble"], FAMILY.prepare(
        to_frame(train, model.schema), train[LABEL].to_numpy()), Context(model.schema, 1.0, 0, len(train)))
    return FAMILY.scorer(fitted, model.schema)


def test_examples_are_held_out_records_of_each_outcome(model_dir, test_split):
    model = load_model(model_dir)
    examples = model.examples()
    test_records = to_records(test_split, model.schema)
    for outcome, label in (("positive", 1), ("negative", 0)):
        assert len(examples[outcome]) == 25
        labelled = [r for r, y in zip(test_records, test_split["_label"]) if y == label]
        assert all(e in labelled for e in examples[outcome])


def test_round_trip_reproduces_the_reported_test_metrics(model_dir, test_split):
    model = load_model(model_dir)
    p = model.predict_proba(test_split)
    y = test_split["_label"].to_numpy()
    manifest = model.manifest["metrics"]["test"]
    assert metrics.average_precision(y, p) == manifest["average_precision"]
    assert metrics.brier(y, p) == manifest["brier"]
    records = test_split.head(20).to_dict(orient="records")
    assert np.array_equal(model.predict_proba(records), p[:20])  # records (API) and frames (batch) agree


def test_minimum_quality_well_above_no_skill(model_dir):
    m = load_model(model_dir).manifest["metrics"]
    assert m["test"]["average_precision"] > 3 * m["no_skill"]["average_precision"]
    assert m["test"]["roc_auc"] > 0.85
    assert m["test"]["brier"] < m["no_skill"]["brier"]


def test_invariance_to_extra_fields_and_robust_to_unseen_levels(model_dir, test_split):
    model = load_model(model_dir)
    records = test_split.head(50).to_dict(orient="records")
    base = model.predict_proba(records)
    assert np.array_equal(model.predict_proba([r | {"unexpected": "x"} for r in records]), base)
    odd = model.predict_proba([r | {"education": "a level never seen"} for r in records])
    assert np.isfinite(odd).all()


def test_contributions_add_up_to_the_raw_score(model_dir, test_split):
    model = load_model(model_dir)
    contribs = model.contributions(test_split.head(30))
    raw = model.raw_rows(model.rows(test_split.head(30)))
    assert np.allclose(1 / (1 + np.exp(-contribs.sum(axis=1))), raw, atol=1e-5)
    assert contribs.shape == (30, len(model.schema.names) + 1)


def copy_of(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "artifacts" / "model"))


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def test_the_manifest_is_checksummed_and_makes_the_version(model_dir):
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and re.fullmatch(r"[0-9a-f]{12}", manifest["model_version"])
    assert content_version(manifest) == manifest["model_version"]  # floats, NaNs read back: the same digest
    assert manifest_sha256(manifest) == manifest["manifest_sha256"]


def swap_two_feature_names(manifest: dict) -> None:
    a, b = manifest["schema"]["features"][:2]
    a["name"], b["name"] = b["name"], a["name"]


TAMPERING = {"threshold set to 0": lambda m: m["threshold"].update(threshold=0),
             "two feature names swapped": swap_two_feature_names,
             "a test metric edited": lambda m: m["metrics"]["test"].update(average_precision=0.999),
             "the examples entry removed from files": lambda m: m["files"].pop("examples.json")}


@pytest.mark.parametrize("change", TAMPERING.values(), ids=TAMPERING.keys())
def test_a_changed_manifest_refuses_to_load(model_dir, tmp_path, change):
    folder = copy_of(model_dir, tmp_path)
    edit_manifest(folder, change)
    for read in (verify_model_dir, load_model):
        with pytest.raises(RareMLError, match="manifest.json was changed after it was written") as caught:
            read(folder)
        assert "\n" not in str(caught.value) and str(folder / "manifest.json") in str(caught.value)


def test_the_server_refuses_a_changed_manifest_with_one_line(model_dir, tmp_path):
    """04_serve.py's main checks the folder first (were it to start instead, the timeout fails the test)."""
    folder = copy_of(model_dir, tmp_path)
    edit_manifest(folder, lambda m: m["threshold"].update(threshold=0))
    proc = run_stage("04_serve.py", "--artifacts", str(folder.parent), "--port", "0", cwd=tmp_path, check=False,
                     timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    version = json.loads((model_dir / "manifest.json").read_text())["model_version"]
    expected = (f"error: {folder / 'manifest.json'} was changed after it was written: its content does not match "
                f"model_version {version} (re-run `make serialize`)")
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [expected]


def test_serializing_the_same_inputs_again_gives_the_same_version(trained, census_small, model_dir, tmp_path):
    again = tmp_path / "artifacts"
    again.mkdir()
    for name in ("train.parquet", "test.parquet", "prepared.json", "tuned.json", "oof.parquet"):
        shutil.copy2(trained / "artifacts" / name, again / name)
    run_stage("03_serialize.py", "--config", str(census_small), "--artifacts", str(again), "--bootstrap", "200",
              "--no-mlflow", cwd=tmp_path)
    first, second = (json.loads((folder / "manifest.json").read_text()) for folder in (model_dir, again / "model"))
    assert second["model_version"] == first["model_version"]
    assert {k for k in first if first[k] != second[k]} <= {"trained_at", "manifest_sha256"}


def test_a_format_1_folder_still_loads_with_a_warning(model_dir, tmp_path, test_split, caplog):
    """A folder as rareml wrote it before the manifest was checksummed (format 1): one booster,
    model.ubj, no members; made here from the trained model's XGBoost member and calibrator."""
    folder = copy_of(model_dir, tmp_path)
    trees = xgboost_member(model_dir)
    for m in json.loads((folder / "manifest.json").read_text())["members"]:
        for name in m["files"]:
            (folder / name).unlink()
    trees.booster.save_model(folder / "model.ubj")
    from rareml.artifacts import file_sha256

    files = {n: file_sha256(folder / n) for n in ("model.ubj", "calibrator.json", "examples.json")}
    legacy = hashlib.sha256((files["model.ubj"] + files["calibrator.json"]).encode()).hexdigest()[:12]
    edit_manifest(folder, lambda m: (m.pop("manifest_sha256"), m.pop("members"),
                                     m.update(format_version=1, model_version=legacy, files=files, encoding=trees.encoding)))
    with caplog.at_level(logging.WARNING, logger="rareml.model"):
        old = load_model(folder)
    assert old.version == legacy and "model format 1" in caplog.text and "make serialize" in caplog.text
    model = load_model(model_dir)
    rows = model.rows(test_split.head(50))
    assert np.array_equal(old.predict_proba(test_split.head(50)), model.calibrator.predict(trees.raw(rows)))


@pytest.mark.parametrize("damage", ["member", "calibrator.json", "manifest.json", "examples.json"])
def test_tampered_or_missing_files_refuse_to_load(model_dir, tmp_path, damage):
    if damage == "member":
        damage = json.loads((model_dir / "manifest.json").read_text())["members"][-1]["files"][0]
    copy = tmp_path / "model"
    copy.mkdir()
    for f in model_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / damage).write_bytes((copy / damage).read_bytes()[:-10] + b"tampered!!")
    with pytest.raises(RareMLError):
        load_model(copy)
    (copy / damage).unlink()
    with pytest.raises(RareMLError):
        load_model(copy)


def test_mlflow_has_a_parent_run_and_one_child_run_per_trial(trained, client):
    tuned = json.loads((trained / "artifacts" / "tuned.json").read_text())
    parent_id = tuned["mlflow"]["parent_run_id"]
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == sum(tuned["trials"].values()) == 4 * len(tuned["families"])
    for child in children:
        assert child.data.tags["state"] in ("COMPLETE", "PRUNED") and child.data.tags["family"] in tuned["families"]
        assert child.data.params["family"] == child.data.tags["family"] and "duration_s" in child.data.metrics
        assert "learning_rate" in child.data.params or child.data.tags["family"] != "xgboost"
    complete = [c for c in children if c.data.tags["state"] == "COMPLETE"]
    assert complete and all("cv_average_precision_mean" in c.data.metrics for c in complete)
    assert parent.data.metrics["best_cv_average_precision"] == max(
        c.data.metrics["cv_average_precision_mean"] for c in complete)
    assert "test_average_precision_ci_low" in parent.data.metrics
    artifacts = {a.path for folder in ("tuning", "reports", "config") for a in client.list_artifacts(parent_id, folder)}
    artifacts |= {a.path for name in tuned["families"] for a in client.list_artifacts(parent_id, f"tuning/{name}")}
    for name in ("tuning/xgboost/optuna_history.png", "tuning/xgboost/optuna_param_importances.png", "reports/pr_roc.png",
                 "reports/reliability.png", "reports/threshold.png", "reports/confusion_matrix.png",
                 "reports/shap_beeswarm.png", "reports/shap_importance.png", "config/config.toml"):
        assert name in artifacts, name


def test_registry_champion_serves_the_same_probabilities(trained, client, model_dir, test_split):
    version = client.get_model_version_by_alias("census-small", "champion")
    serialized = json.loads((trained / "artifacts" / "serialized.json").read_text())
    assert str(version.version) == str(serialized["mlflow"]["version"])
    pyfunc = mlflow.pyfunc.load_model("models:/census-small@champion")
    out = pyfunc.predict(test_split.head(25))
    expected = load_model(model_dir).predict_proba(test_split.head(25))
    assert np.allclose(out["probability"].to_numpy(), expected)


def test_servers_check_the_compiled_trees_against_xgboost_before_serving(model_dir):
    model = load_model(model_dir)
    model.check()  # the trained model: every member's serving path agrees with its reference on the examples
    trees = xgboost_member(model_dir)
    examples = [r for records in model.examples().values() for r in records]
    assert examples
    rows = model.encoder.model_rows(model.encoder.encode_many(examples)[0])
    trees.check(rows)
    assert "ensemble" in trees.__dict__
    ensemble = trees.ensemble
    trees.__dict__["ensemble"] = dataclasses.replace(ensemble, split=ensemble.split + np.float32(0.5))
    with pytest.raises(RareMLError, match="disagree with XGBoost"):
        trees.check(rows)
