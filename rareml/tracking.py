"""MLflow set-up shared by the tuning and serialization stages: the experiment, run names, and the
prepared splits logged as the runs' input datasets."""
from __future__ import annotations

import os
import warnings
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from rareml.data import LABEL, frame_fingerprint

if TYPE_CHECKING:
    from mlflow.data.pandas_dataset import PandasDataset
    from mlflow.types import Schema

    from rareml.config import Config

# The experiment's kind, the tag MLflow 3 sets on its own demo experiment (`genai_development` there): model
# training here. MLflow 3.17.2's UI does not read it to choose its pages: they follow its GenAI / Model
# training switch (GenAI in a fresh browser: "Start tracing your LLM application"), which `ui_url` sets.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
CONTEXTS = {"train": "training", "test": "test"}  # the input's context, as the UI shows it
SCHEMA_ROWS = 200


def allow_file_store() -> None:
    """MLflow 3.17 refuses a plain folder (./mlruns) unless MLFLOW_ALLOW_FILE_STORE is set: the
    default must work with no set-up, so it is allowed unless the user decided otherwise."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", message=".*[Ff]ile.?[Ss]tore.*")


def use_tracking_store() -> str:
    """Point MLflow where every stage logs: MLFLOW_TRACKING_URI, else ./mlruns (a plain folder
    allowed: `allow_file_store`); returns the URI."""
    import mlflow

    allow_file_store()
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "mlruns"))
    return mlflow.get_tracking_uri()


def setup_mlflow(experiment: str) -> str:
    """Select (creating it if needed) the experiment at the stages' tracking URI
    (`use_tracking_store`), tagged as model training; returns the URI."""
    import mlflow

    uri = use_tracking_store()
    if is_database(uri) and mlflow.get_experiment_by_name(experiment) is None:
        # a database store would put artifacts in ./mlruns, where they clash with the default file store
        mlflow.create_experiment(experiment, artifact_location=Path("mlartifacts").resolve().as_uri(),
                                 tags={KIND_TAG: KIND})
    found = mlflow.set_experiment(experiment)
    if KIND_TAG not in found.tags:  # created just now, or by an older rareml; a kind chosen in the UI stays
        mlflow.MlflowClient().set_experiment_tag(found.experiment_id, KIND_TAG, KIND)
    return uri


def run_name(dataset: str, stage: str, at: datetime | None = None) -> str:
    """`census-income-kdd tune 2026-12-01 21:05`: which data, which stage, when (local time)."""
    return f"{dataset} {stage} {(at or datetime.now()):%Y-%m-%d %H:%M}"


def log_split(frame: pd.DataFrame, part: str, path: Path, config: Config, prepared: dict) -> PandasDataset:
    """Log a prepared split (`part`: train or test) as an input dataset of the active run: named
    `<dataset>-<part>`, its source the parquet file the stage read, its digest the split's
    fingerprint (all rows and the index, as in prepared.json), the data file it was cut from as tags."""
    import mlflow

    with warnings.catch_warnings():  # MLflow 3.17 registers its local-file source class twice: a path matches both
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        dataset = mlflow.data.from_pandas(frame, source=str(Path(path).resolve()), name=f"{config.name}-{part}",
                                          targets=LABEL, digest=frame_fingerprint(frame))
    dataset.schema = dataset_schema(frame)  # a cached_property: MLflow's own would look at every value
    mlflow.log_input(dataset, context=CONTEXTS[part], tags=origin_tags(config, prepared, part))
    return dataset


def dataset_schema(frame: pd.DataFrame) -> Schema:
    """The schema MLflow infers for `frame`, from a few of its rows: the first ones and, for each
    column with a missing value, one where it is missing. MLflow walks every value in Python (tens
    of seconds on census's 150,000-row training split); the types follow from the dtypes (text columns hold
    only strings and missing values) and `required` from the missing values, so these rows suffice."""
    from mlflow.models import infer_signature

    missing = frame.isna().to_numpy()
    first_missing = missing.argmax(axis=0)[missing.any(axis=0)] if len(frame) else []
    rows = np.union1d(np.arange(min(SCHEMA_ROWS, len(frame))), first_missing).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hint about integer columns is for model signatures
        return infer_signature(frame.iloc[rows]).inputs


def origin_tags(config: Config, prepared: dict, part: str) -> dict[str, str]:
    """Input tags naming the data file a split was cut from, with its SHA-256 when prepared.json has it."""
    if part == "test" and config.test_data is not None:
        return {"rareml.data_file": str(config.test_data)}
    tags = {"rareml.data_file": str(prepared.get("config", {}).get("data") or config.data)}
    sha = prepared.get("fingerprint", {}).get("data_file_sha256")
    return tags | ({"rareml.data_file_sha256": sha} if sha else {})


def is_database(uri: str) -> bool:
    return "://" in uri and not uri.startswith(("file:", "http:", "https:"))


def ui_url(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The experiment's training runs in the MLflow UI, on its model-training pages whatever the
    browser chose last (the plain experiment page opens on GenAI traces in MLflow 3.17.2)."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on these runs (a plain folder needs the file-store opt-in)."""
    opt_in = "" if is_database(uri) else "MLFLOW_ALLOW_FILE_STORE=true "
    return f"{opt_in}.venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def copy_file_store(src: Path, dst: Path) -> None:
    """Copy a file tracking store (./mlruns) to `dst`, its absolute artifact locations rewritten to
    point into the copy: runs logged to the copy then keep their artifacts there, not in `src`."""
    import shutil

    src, dst = Path(src).resolve(), Path(dst).resolve()
    shutil.copytree(src, dst, symlinks=True)
    for meta in dst.rglob("meta.yaml"):
        text = meta.read_text(encoding="utf-8")
        moved = text.replace(src.as_uri(), dst.as_uri()).replace(str(src), str(dst))
        if moved != text:
            meta.write_text(moved, encoding="utf-8")
