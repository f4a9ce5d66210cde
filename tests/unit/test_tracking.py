import mlflow

from rareml.tracking import setup_mlflow, ui_command


def test_database_store_keeps_artifacts_out_of_the_default_mlruns_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    uri = setup_mlflow("exp")
    location = mlflow.get_experiment_by_name("exp").artifact_location
    assert location == (tmp_path / "mlartifacts").as_uri()
    assert setup_mlflow("exp") == uri  # a second stage finds the same experiment
    assert ui_command(uri).startswith(".venv/bin/mlflow ui")
    assert ui_command("mlruns").startswith("MLFLOW_ALLOW_FILE_STORE=true")
