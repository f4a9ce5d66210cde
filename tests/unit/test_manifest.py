"""The model folder's manifest is covered by its own checksum and makes the model's version: a threshold,
schema, weight, metric or file list changed after `save_model` is refused with one line; format-1 and
format-2 folders (one XGBoost booster, before model families) still load."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from rareml.artifacts import file_sha256
from rareml.calibration import Calibrator
from rareml.errors import RareMLError
from rareml.families.xgboost import Fit
from rareml.features import Feature, Schema
from rareml.model import MANIFEST_FILE, content_version, load_model, manifest_sha256, save_model, verify_model_dir

BOOSTER_FILE, CALIBRATOR_FILE, EXAMPLES_FILE = "xgboost.ubj", "calibrator.json", "examples.json"
LEGACY_BOOSTER = "model.ubj"  # formats 1 and 2

SCHEMA = Schema(features=(Feature("a", "numeric", min=-3.0, max=3.0, typical=0.0),
                          Feature("b", "numeric", min=0.0, max=100.0, typical=50.0)),
                target="y", positive=1, sensitive=("g",))
CHANGED = "manifest.json was changed after it was written"


@pytest.fixture(scope="module")
def booster() -> xgb.Booster:
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"a": rng.normal(size=300), "b": rng.uniform(0, 100, 300)})
    y = ((X["a"] + X["b"] / 50 + rng.normal(0, 0.5, 300)) > 1.5).astype(int)
    return xgb.train({"objective": "binary:logistic", "max_depth": 2, "seed": 0, "nthread": 1},
                     xgb.DMatrix(X, label=y), 5)


def manifest(**changes) -> dict:
    """What 03_serialize passes, with floats that JSON must carry exactly (and a NaN, a tuple, numeric keys)."""
    return {"name": "toy", "encoding": "native", "trained_at": "2024-01-01T00:00:00+00:00",
            "threshold": {"threshold": 0.1 + 0.2, "metric": "f1"},
            "metrics": {"test": {"average_precision": 1 / 3, "brier": 5e-324, "roc_auc": 1.7976931348623157e308,
                                 "ece": -0.0, "ci": (0.25, 0.75)},
                        "fairness": {"g": {10: {"selection_rate": math.nan}, 2: {"selection_rate": 0.1}}}},
            "schema": SCHEMA.to_dict(), "reference": {"a": {"mean": 1e-17, "edges": [-1.5, 0.0, 2 ** 60]}},
            "note": "ünïcode"} | changes


EXAMPLES = {"positive": [{"a": 2.0, "b": 90.0, "g": 1}], "negative": [{"a": -1.0, "b": 5.0, "g": 2}]}


def members(booster: xgb.Booster) -> list[dict]:
    return [{"family": "xgboost", "weight": 1.0, "fitted": Fit(booster, "native"), "choice": {"max_depth": 2}}]


def write(folder: Path, booster: xgb.Booster, **changes) -> dict:
    return save_model(folder, members(booster), Calibrator("sigmoid", a=1.1, b=-0.2), manifest(**changes), EXAMPLES)


@pytest.fixture
def folder(tmp_path, booster) -> Path:
    write(tmp_path / "model", booster)
    return tmp_path / "model"


def edit(folder: Path, change) -> None:
    """Change the manifest as a person would: read it, edit it, write it back as it was laid out."""
    data = json.loads((folder / MANIFEST_FILE).read_text())
    change(data)
    (folder / MANIFEST_FILE).write_text(json.dumps(data, indent=2) + "\n")


def test_an_untouched_folder_verifies_and_loads(folder):
    written = json.loads((folder / MANIFEST_FILE).read_text())
    assert written["format_version"] == 3 and re.fullmatch(r"[0-9a-f]{12}", written["model_version"])
    # read back from its file (floats, NaN, -0.0 and 2**60 through JSON text), it hashes as written
    assert content_version(written) == written["model_version"]
    assert manifest_sha256(written) == written["manifest_sha256"]
    assert set(written["files"]) == {BOOSTER_FILE, CALIBRATOR_FILE, EXAMPLES_FILE}
    assert [(m["family"], m["weight"], m["files"], m["encoding"]) for m in written["members"]] == \
        [("xgboost", 1.0, [BOOSTER_FILE], "native")]
    assert verify_model_dir(folder)["model_version"] == written["model_version"]
    model = load_model(folder)
    assert model.version == written["model_version"] and model.threshold == 0.1 + 0.2
    assert model.examples() == EXAMPLES


def test_the_returned_manifest_is_the_written_one(tmp_path, booster):
    returned = write(tmp_path / "model", booster)
    assert json.dumps(returned) == json.dumps(json.loads((tmp_path / "model" / MANIFEST_FILE).read_text()))


def test_the_layout_of_the_file_is_not_its_content(folder):
    data = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps(dict(reversed(list(data.items()))), indent=4, sort_keys=True))
    assert verify_model_dir(folder)["model_version"] == data["model_version"]


def swap_feature_names(m: dict) -> None:
    a, b = m["schema"]["features"][:2]
    a["name"], b["name"] = b["name"], a["name"]


TAMPERING = {
    "threshold set to 0": lambda m: m["threshold"].update(threshold=0),
    "two feature names swapped": swap_feature_names,
    "a metric edited": lambda m: m["metrics"]["test"].update(average_precision=0.99),
    "a reference statistic edited": lambda m: m["reference"]["a"].update(mean=0.5),
    "the examples entry removed from files": lambda m: m["files"].pop(EXAMPLES_FILE),
    "the booster entry removed from files": lambda m: m["files"].pop(BOOSTER_FILE),
    "a member's weight edited": lambda m: m["members"][0].update(weight=0.5),
    "a member's file renamed": lambda m: m["members"][0].update(files=["other.ubj"]),
    "trained_at edited": lambda m: m.update(trained_at="2030-01-01T00:00:00+00:00"),
    "model_version edited": lambda m: m.update(model_version="0123456789ab"),
    "manifest_sha256 removed": lambda m: m.pop("manifest_sha256"),
    "a field added": lambda m: m.update(extra=1),
    "the float's last digit changed": lambda m: m["threshold"].update(threshold=0.30000000000000009),
}


@pytest.mark.parametrize("change", TAMPERING.values(), ids=TAMPERING.keys())
def test_a_changed_manifest_is_refused_with_one_line(folder, change):
    edit(folder, change)
    recorded = json.loads((folder / MANIFEST_FILE).read_text())["model_version"]
    for read in (verify_model_dir, load_model):
        with pytest.raises(RareMLError, match=CHANGED) as caught:
            read(folder)
        message = str(caught.value)
        assert "\n" not in message and message.startswith(str(folder / MANIFEST_FILE))
        assert f"model_version {recorded}" in message and "make serialize" in message


def test_a_changed_file_is_still_refused(folder):
    (folder / CALIBRATOR_FILE).write_text(json.dumps(Calibrator("sigmoid", a=9.0).to_dict(), indent=2) + "\n")
    with pytest.raises(RareMLError, match="calibrator.json is missing or does not match its checksum"):
        verify_model_dir(folder)


def test_files_outside_the_folder_are_not_read(folder):
    """A manifest is checked before the files it names are opened."""
    edit(folder, lambda m: m["files"].update({"../secret": "0" * 64}))
    with pytest.raises(RareMLError, match=CHANGED):
        verify_model_dir(folder)


def test_an_unknown_format_is_refused(folder):
    edit(folder, lambda m: m.update(format_version=4))
    with pytest.raises(RareMLError, match=r"unsupported model format 4 \(this rareml reads formats 1 to 3\)"):
        verify_model_dir(folder)


def test_the_same_inputs_give_the_same_version(tmp_path, booster):
    """A model serialized again from the same inputs keeps its version (the prediction log and the dashboards
    carry on); anything that changes what it decides or reports is a new version."""
    first = write(tmp_path / "1", booster)
    assert write(tmp_path / "2", booster, trained_at="2025-06-30T12:00:00+00:00")["model_version"] == \
        first["model_version"]
    assert file_sha256(tmp_path / "1" / BOOSTER_FILE) == file_sha256(tmp_path / "2" / BOOSTER_FILE)
    others = {"threshold": write(tmp_path / "3", booster, threshold={"threshold": 0.5, "metric": "f1"}),
              "calibrator": save_model(tmp_path / "4", members(booster), Calibrator("sigmoid", a=1.2), manifest(),
                                       EXAMPLES),
              "examples": save_model(tmp_path / "5", members(booster), Calibrator("sigmoid", a=1.1, b=-0.2), manifest(),
                                     EXAMPLES | {"negative": []}),
              "booster": write(tmp_path / "6", xgb.train({"objective": "binary:logistic", "max_depth": 1},
                                                         xgb.DMatrix(np.eye(4), label=[0, 1, 0, 1]), 2))}
    versions = {name: m["model_version"] for name, m in others.items()}
    assert first["model_version"] not in versions.values() and len(set(versions.values())) == len(versions)


def test_save_model_writes_the_checksums_itself(tmp_path, booster):
    for key in ("model_version", "manifest_sha256", "format_version", "files", "members"):
        with pytest.raises(ValueError, match=key):
            save_model(tmp_path, members(booster), Calibrator(), manifest(**{key: "x"}))
    with pytest.raises(ValueError, match="one member per family"):
        save_model(tmp_path, members(booster) * 2, Calibrator(), manifest())


def write_format_1(folder: Path, booster: xgb.Booster) -> dict:
    """A model folder as rareml wrote it before format 2 (save_model of FORMAT_VERSION = 1, verbatim)."""
    folder.mkdir(parents=True)
    booster.save_model(folder / LEGACY_BOOSTER)
    (folder / CALIBRATOR_FILE).write_text(json.dumps(Calibrator("sigmoid", a=1.1).to_dict(), indent=2) + "\n")
    files = {name: file_sha256(folder / name) for name in (LEGACY_BOOSTER, CALIBRATOR_FILE)}
    version = hashlib.sha256("".join(files.values()).encode()).hexdigest()[:12]
    (folder / EXAMPLES_FILE).write_text(json.dumps(EXAMPLES, indent=1) + "\n")
    files[EXAMPLES_FILE] = file_sha256(folder / EXAMPLES_FILE)
    written = {"format_version": 1, "model_version": version, **manifest(), "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(written, indent=2) + "\n")
    return written


def test_a_format_1_folder_still_loads_with_a_warning(tmp_path, booster, caplog):
    written = write_format_1(tmp_path / "old", booster)
    with caplog.at_level(logging.WARNING, logger="rareml.model"):
        model = load_model(tmp_path / "old")
    assert model.version == written["model_version"] and model.examples() == EXAMPLES
    assert model.predict_proba([{"a": 1.0, "b": 40.0}]).shape == (1,)
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "model format 1" in warning and "not covered" in warning and "make serialize" in warning


@pytest.mark.parametrize("damage", ["booster", "model_version", "upgraded by hand"])
def test_a_damaged_format_1_folder_is_refused(tmp_path, booster, damage):
    write_format_1(tmp_path / "old", booster)
    if damage == "booster":
        with open(tmp_path / "old" / LEGACY_BOOSTER, "ab") as fh:
            fh.write(b"tampered")
        expected = "model.ubj is missing or does not match its checksum"
    else:
        expected = CHANGED
        edit(tmp_path / "old", (lambda m: m.update(model_version="0123456789ab")) if damage == "model_version" else
             (lambda m: m.update(manifest_sha256="0" * 64)))
    with pytest.raises(RareMLError, match=expected):
        load_model(tmp_path / "old")


def test_a_format_2_folder_loads_as_one_xgboost_member(tmp_path, booster):
    """A folder as rareml wrote it before model families (format 2: model.ubj, the encoding and the
    XGBoost parameters at the top of the manifest) serves what it served, and its configuration
    still warm-starts a retraining."""
    folder = tmp_path / "old"
    folder.mkdir()
    booster.save_model(folder / LEGACY_BOOSTER)
    (folder / CALIBRATOR_FILE).write_text(json.dumps(Calibrator("sigmoid", a=1.1).to_dict(), indent=2) + "\n")
    params = {"grow_policy": "depthwise", "max_depth": 2, "learning_rate": 0.3, "n_estimators": 5}
    content = json.loads(json.dumps({"format_version": 2, **manifest(), "params": params,
                                     "files": {n: file_sha256(folder / n) for n in (LEGACY_BOOSTER, CALIBRATOR_FILE)}}))
    written = {"format_version": 2, "model_version": content_version(content), **content}
    written["manifest_sha256"] = manifest_sha256(written)
    (folder / MANIFEST_FILE).write_text(json.dumps(written, indent=2) + "\n")
    model = load_model(folder)
    assert model.version == written["model_version"] and model.kind == "xgboost"
    assert model.members[0].entry["choice"]["max_depth"] == 2 and model.members[0].entry["encoding"] == "native"
    X = pd.DataFrame({"a": [1.0, -2.0], "b": [40.0, np.nan]})
    expected = Calibrator("sigmoid", a=1.1).predict(booster.predict(xgb.DMatrix(X)))
    np.testing.assert_allclose(model.predict_proba(X), expected, rtol=1e-6)
    edit(folder, lambda m: m["params"].update(max_depth=9))
    with pytest.raises(RareMLError, match=CHANGED):
        load_model(folder)
