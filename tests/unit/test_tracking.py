import json
import os
from datetime import datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from rareml.config import Config
from rareml.data import LABEL, frame_fingerprint
from rareml.tracking import (
    KIND,
    KIND_TAG,
    SCHEMA_ROWS,
    dataset_schema,
    log_split,
    run_name,
    setup_mlflow,
    ui_command,
)

# MLflow's own inference (the reference here) hints that integer columns cannot hold missing values
pytestmark = pytest.mark.filterwarnings("ignore:Hint. Inferred schema contains integer:UserWarning")


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """MLflow at a file store in tmp_path, set as the stages set it; nothing leaks to later tests
    (set_tracking_uri also exports MLFLOW_TRACKING_URI, which stage subprocesses would inherit)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "mlruns"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "mlruns"))
    yield tmp_path
    mlflow.set_tracking_uri(None)


def frame(rows: int = 3 * SCHEMA_ROWS) -> pd.DataFrame:
    """Text, integer and float columns whose only missing values come after the first SCHEMA_ROWS rows."""
    rng = np.random.default_rng(0)
    text = pd.Series(rng.choice(["a", "b", "c"], rows), dtype="str")
    text.iloc[-5:] = np.nan
    amount = rng.normal(size=rows)
    amount[-1] = np.nan
    return pd.DataFrame(
        {
            "text": text,
            "count": rng.integers(0, 9, rows),
            "small": np.int8(3),
            "amount": amount,
            "full_text": pd.Series(["x"] * rows, dtype="str"),
            LABEL: rng.integers(0, 2, rows),
        },
        index=pd.RangeIndex(rows, name="_row"),
    )


def config(tmp_path: Path, **kw) -> Config:
    return Config(name="toy", data=tmp_path / "toy.csv", target="y", positive=1, path=tmp_path / "toy.toml", **kw)


def test_database_store_keeps_artifacts_out_of_the_default_mlruns_folder(tracking, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracking / 'mlflow.db'}")
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "mlruns"))
    uri = setup_mlflow("exp")
    experiment = mlflow.get_experiment_by_name("exp")
    assert experiment.artifact_location == (tracking / "mlartifacts").as_uri()
    assert experiment.tags[KIND_TAG] == KIND
    assert setup_mlflow("exp") == uri  # a second stage finds the same experiment
    assert ui_command(uri).startswith(".venv/bin/mlflow ui")
    assert ui_command("mlruns").startswith("MLFLOW_ALLOW_FILE_STORE=true")


def test_setup_uses_the_uri_the_stage_set_and_tags_the_experiment_as_model_training(tracking):
    setup_mlflow("exp")
    assert mlflow.get_experiment_by_name("exp").tags[KIND_TAG] == "custom_model_development"
    assert (tracking / "mlruns").is_dir() and not (tracking / "mlflow.db").exists()


def test_an_experiment_without_a_kind_gets_one_and_a_chosen_kind_stays(tracking):
    client = mlflow.MlflowClient()
    old = client.create_experiment("old")  # as rareml made them before
    chosen = client.create_experiment("chosen", tags={KIND_TAG: "genai_development"})
    assert KIND_TAG not in client.get_experiment(old).tags
    setup_mlflow("old")
    setup_mlflow("chosen")
    assert client.get_experiment(old).tags[KIND_TAG] == KIND
    assert client.get_experiment(chosen).tags[KIND_TAG] == "genai_development"


def test_run_names_say_which_data_which_stage_and_when():
    assert (
        run_name("census-income-kdd", "tune", datetime(2026, 12, 1, 21, 5)) == "census-income-kdd tune 2026-12-01 21:05"
    )
    assert run_name("credit", "serialize").startswith(f"credit serialize {datetime.now():%Y-%m-%d}")


def test_the_quick_schema_is_the_one_mlflow_infers_from_every_row():
    data = frame()
    quick = dataset_schema(data)
    assert quick == mlflow.models.infer_signature(data).inputs
    required = {c.name: c.required for c in quick.inputs}
    assert required == {"text": False, "count": True, "small": True, "amount": False, "full_text": True, LABEL: True}
    assert dataset_schema(data.head(0)) == mlflow.models.infer_signature(data.head(0)).inputs


def test_a_split_is_logged_with_its_fingerprint_source_context_and_data_file(tracking):
    data, path = frame(), tracking / "artifacts" / "train.parquet"
    prepared = {"config": {"data": "/data/toy.csv"}, "fingerprint": {"data_file_sha256": "ab" * 32}}
    setup_mlflow("toy")
    with mlflow.start_run() as run:
        log_split(data, "train", path, config(tracking), prepared)
    with mlflow.start_run(run_id=run.info.run_id):  # serialize logs both splits to the tuning run
        for part, split in (("train", data), ("test", data.iloc[:100])):
            log_split(
                split,
                part,
                tracking / "artifacts" / f"{part}.parquet",
                config(tracking, test_data=tracking / "later.csv"),
                prepared,
            )
    inputs = {i.dataset.name: i for i in mlflow.get_run(run.info.run_id).inputs.dataset_inputs}
    assert len(mlflow.get_run(run.info.run_id).inputs.dataset_inputs) == 2  # train logged twice, kept once
    train, test = inputs["toy-train"].dataset, inputs["toy-test"].dataset
    assert train.digest == frame_fingerprint(data) and test.digest == frame_fingerprint(data.iloc[:100])
    assert train.source_type == "local" and json.loads(train.source) == {"uri": str(path)}
    assert json.loads(train.profile)["num_rows"] == 600 and json.loads(test.profile)["num_rows"] == 100
    assert {t.key: t.value for t in inputs["toy-train"].tags} == {
        "mlflow.data.context": "training",
        "rareml.data_file": "/data/toy.csv",
        "rareml.data_file_sha256": "ab" * 32,
    }
    assert {t.key: t.value for t in inputs["toy-test"].tags} == {
        "mlflow.data.context": "test",
        "rareml.data_file": str(tracking / "later.csv"),
    }
    logged = mlflow.types.Schema.from_json(json.dumps(json.loads(train.schema)["mlflow_colspec"]))
    assert logged == mlflow.models.infer_signature(data).inputs


def test_a_copied_file_store_keeps_its_artifacts_in_the_copy(tmp_path):
    from rareml.tracking import copy_file_store

    src = tmp_path / "mlruns"
    (src / "1" / "abc").mkdir(parents=True)
    (src / "1" / "meta.yaml").write_text(f"artifact_location: {src / '1'}\nname: x\n")
    (src / "1" / "abc" / "meta.yaml").write_text(f"artifact_uri: {(src / '1' / 'abc').as_uri()}/artifacts\n")
    copy_file_store(src, tmp_path / "copy")
    dst = (tmp_path / "copy").resolve()
    assert (dst / "1" / "meta.yaml").read_text() == f"artifact_location: {dst / '1'}\nname: x\n"
    assert (dst / "1" / "abc" / "meta.yaml").read_text() == f"artifact_uri: {(dst / '1' / 'abc').as_uri()}/artifacts\n"
    assert str(src) in (src / "1" / "meta.yaml").read_text()  # the original is untouched
