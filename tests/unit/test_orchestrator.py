"""The Airflow client's settings from the environment, and its run ids (no server needed here:
tests/integration/test_airflow.py talks to a real one)."""
from __future__ import annotations

import pytest

from rareml.errors import RareMLError
from rareml.orchestrator import Airflow, OrchestratorUnavailable, run_id
from rareml.processes import free_port


def test_no_url_means_no_orchestrator():
    assert Airflow.from_env({}) is None and Airflow.from_env({"RAREML_AIRFLOW_URL": ""}) is None


def test_the_environment_gives_url_login_and_run_params_over_the_apis_own():
    got = Airflow.from_env({"RAREML_AIRFLOW_URL": "http://127.0.0.1:18080/", "RAREML_AIRFLOW_PASSWORD": "pw",
                            "RAREML_AIRFLOW_CONF": '{"budget": 300, "db": "other.db"}'},
                           {"artifacts": "/srv/artifacts", "db": "/srv/artifacts/serving/predictions.db"})
    assert (got.url, got.username, got.password) == ("http://127.0.0.1:18080", "admin", "pw")
    assert got.conf == {"artifacts": "/srv/artifacts", "db": "other.db", "budget": 300}


@pytest.mark.parametrize(("environ", "says"), [
    ({"RAREML_AIRFLOW_URL": "http://127.0.0.1:18080"}, "RAREML_AIRFLOW_PASSWORD is not"),
    ({"RAREML_AIRFLOW_URL": "127.0.0.1:18080", "RAREML_AIRFLOW_PASSWORD": "pw"}, "http(s) address"),
    ({"RAREML_AIRFLOW_URL": "http://a", "RAREML_AIRFLOW_PASSWORD": "pw", "RAREML_AIRFLOW_CONF": "{"}, "not JSON"),
    ({"RAREML_AIRFLOW_URL": "http://a", "RAREML_AIRFLOW_PASSWORD": "pw", "RAREML_AIRFLOW_CONF": "[1]"}, "JSON object"),
])
def test_a_wrong_setting_is_named(environ, says):
    with pytest.raises(RareMLError, match=says.replace("(", r"\(").replace(")", r"\)")):
        Airflow.from_env(environ)


def test_the_run_id_is_the_same_for_the_same_alert_and_differs_otherwise():
    first = run_id('{}:{alertname="RareMLDataDrift"}', "2026-12-01T10:00:00Z")
    assert first == run_id('{}:{alertname="RareMLDataDrift"}', "2026-12-01T10:00:00Z")
    assert first != run_id('{}:{alertname="RareMLDataDrift"}', "2026-12-01T10:05:00Z")
    assert first != run_id('{}:{alertname="RareMLLivePerformanceDecay"}', "2026-12-01T10:00:00Z")
    assert first.startswith("alert__") and first.replace("_", "").isalnum()


def test_nothing_listening_is_unavailable_not_an_error_of_the_caller():
    with pytest.raises(OrchestratorUnavailable, match="cannot be reached"):
        Airflow(f"http://127.0.0.1:{free_port()}", "admin", "pw", timeout=1.0).trigger("alert__x", {})
