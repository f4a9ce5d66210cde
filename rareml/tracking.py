"""MLflow set-up shared by the tuning and serialization stages."""
from __future__ import annotations

import os
import warnings
from pathlib import Path


def setup_mlflow(experiment: str) -> str:
    """Point MLflow at MLFLOW_TRACKING_URI (default: the local `mlruns` folder) and select the
    experiment. MLflow 3.17 refuses a plain folder unless MLFLOW_ALLOW_FILE_STORE is set: the
    default must work with no set-up, so it is allowed here unless the user decided otherwise."""
    import mlflow

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", message=".*[Ff]ile.?[Ss]tore.*")
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "mlruns"))
    uri = mlflow.get_tracking_uri()
    if is_database(uri) and mlflow.get_experiment_by_name(experiment) is None:
        # a database store would put artifacts in ./mlruns, where they clash with the default file store
        mlflow.create_experiment(experiment, artifact_location=Path("mlartifacts").resolve().as_uri())
    mlflow.set_experiment(experiment)
    return uri


def is_database(uri: str) -> bool:
    return "://" in uri and not uri.startswith(("file:", "http:", "https:"))


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on these runs (a plain folder needs the file-store opt-in)."""
    opt_in = "" if is_database(uri) else "MLFLOW_ALLOW_FILE_STORE=true "
    return f"{opt_in}.venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
