"""The API tier: the real Flask app of 04_serve.py over the model the session trains (tests/conftest.py),
with its prediction log in a temporary folder, driven through Flask's test client."""
from __future__ import annotations

import importlib
from pathlib import Path

import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rareml.features import to_records
from rareml.model import Model, load_model


@pytest.fixture(scope="session")
def serve():
    return importlib.import_module("04_serve")


@pytest.fixture(scope="session")
def model_dir(trained) -> Path:
    return trained / "artifacts" / "model"


@pytest.fixture(scope="session")
def model(model_dir) -> Model:
    return load_model(model_dir)


@pytest.fixture(scope="session")
def test_frame(trained) -> pd.DataFrame:
    return pd.read_parquet(trained / "artifacts" / "test.parquet")


@pytest.fixture(scope="session")
def records(test_frame, model) -> list[dict]:
    """The test split as the JSON records the API takes (features and sensitive attributes)."""
    return to_records(test_frame, model.schema)


@pytest.fixture
def make_app(serve, model_dir, tmp_path, monkeypatch):
    """create_app over the trained model; the log in tmp_path unless `db` is given; gauges fresh on every scrape."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)  # one process: the app's own registry

    def make(db: Path | None = None, **options):
        return serve.create_app(model_dir, db or tmp_path / "serving" / "predictions.db", **({"refresh": 0} | options))

    return make


@pytest.fixture
def client(make_app):
    return make_app().test_client()


def scrape(client) -> dict[tuple[str, tuple], float]:
    """GET /metrics parsed: (sample name, sorted labels) -> value."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.get_data(as_text=True)) for s in family.samples}


def sample(metrics: dict, metric: str, /, **labels) -> float | None:
    return metrics.get((metric, tuple(sorted(labels.items()))))
