"""The service seam and the small hardening items: the fast path and the Flask route are one
implementation (same answers, same counts, a switch to turn the fast path off), headers, query
parameters named as sent, the settings object, the model behind one reference."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tests.api.conftest import sample, scrape


def post(client, path, body, **kwargs):
    return client.post(path, data=body if isinstance(body, (bytes, str)) else json.dumps(body),
                       content_type="application/json", **kwargs)


BODIES = [lambda r: r, lambda r: b"{", lambda r: b"", lambda r: {k: v for k, v in r.items() if k != "age"},
          lambda r: r | {"nonsense": 1}, lambda r: b'{"age": NaN}', lambda r: [r]]


def test_fast_path_and_flask_route_answer_and_count_alike(make_app, records, tmp_path):
    """The same bodies through the fast path and with it switched off: the same statuses, answers
    (but the prediction id) and counts."""
    outcomes = {}
    for fast in (True, False):
        client = make_app(tmp_path / f"{fast}.db", fast_path=fast).test_client()
        assert (client.application.wsgi_app.__name__ == "predict_fast") == fast
        answers = []
        for make in BODIES:
            response = post(client, "/predict", make(records[0]))
            body = response.get_json()
            body.pop("prediction_id", None)
            answers.append((response.status_code, body, response.headers["X-Content-Type-Options"],
                            response.headers["Content-Type"]))
        m = scrape(client)
        counts = {key: value for key, value in m.items() if key[0] in (
            "rareml_requests_total", "rareml_rejected_inputs_total", "rareml_predictions_total",
            "rareml_request_latency_seconds_count") and ("endpoint", "/metrics") not in key[1]}
        outcomes[fast] = answers, counts
    assert outcomes[True] == outcomes[False]
    assert [status for status, *_ in outcomes[True][0]] == [200, 400, 400, 422, 422, 422, 422]


def test_every_answer_says_nosniff_and_metrics_one_charset(client, records):
    for response in (client.get("/health"), client.get("/nope"), post(client, "/predict", b"{"),
                     client.get("/metrics")):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    content_type = client.get("/metrics").headers["Content-Type"]
    assert content_type.count("charset") == 1 and content_type.startswith("text/plain")


def test_query_parameters_are_named_as_sent(make_app):
    client = make_app(alert_token="s3cret").test_client()
    answer = client.get("/alerts?limit=abc", headers={"Authorization": "Bearer s3cret"})
    assert answer.status_code == 422 and answer.get_json()["field"] == "limit" and "limit" in answer.get_json()["error"]
    answer = client.post("/predict?top=x", data="{}", content_type="application/json")
    assert answer.status_code == 422 and answer.get_json()["field"] == "top"


def test_settings_are_built_once_from_arguments_and_environment(serve, tmp_path):
    args = argparse.Namespace(artifacts=tmp_path, db=None, host="127.0.0.1", port=9, workers=2, worker_threads=3,
                              window=50, refresh=1.0, fairness_bound=0.1, retention_days=2, drain=1.5,
                              read_timeout=4.0)
    settings = serve.Settings.from_args(args, {"RAREML_ALERT_TOKEN": "t", "RAREML_FAST_PATH": "0"})
    assert settings.model_dir == tmp_path / "model" and settings.db == tmp_path / "serving" / "predictions.db"
    assert (settings.alert_token, settings.fast_path, settings.retention) == ("t", False, 2 * 86400)
    assert (settings.window, settings.worker_threads, settings.drain, settings.read_timeout) == (50, 3, 1.5, 4.0)
    with pytest.raises(AttributeError):
        settings.window = 10  # frozen
    assert serve.Settings.from_args(args, {}).alert_token is None


def test_the_model_is_one_reference(make_app, records, model_dir, tmp_path):
    """Replacing Service.served changes what every later request is scored with (the seam the
    hot swap builds on); a request reads it once."""
    from rareml.service import Served

    app = make_app(tmp_path / "swap.db")
    client, svc = app.test_client(), app.extensions["rareml"]
    first = post(client, "/predict", records[0]).get_json()
    other = Served.load(model_dir)
    other = Served(other.model, other.encoder, threshold=0.0, version="swapped-000")
    svc.served = other
    second = post(client, "/predict", records[0]).get_json()
    assert (second["model_version"], second["threshold"], second["decision"]) == ("swapped-000", 0.0, 1)
    assert second["probability"] == first["probability"]
    assert client.get("/model").get_json()["model_version"] == "swapped-000"
    assert client.get("/ready").get_json()["model_version"] == "swapped-000"


def test_metrics_answer_when_the_log_cannot_be_read(make_app, records, tmp_path):
    db = tmp_path / "serving" / "gone.db"
    app = make_app(db)
    client = app.test_client()
    post(client, "/predict", records[0])
    app.extensions["rareml"].store.flush()  # nothing waits to be written: the status must see it anyway
    for attempt in range(50):  # the log's writer may recreate the folder in between: try again
        try:
            db.parent.rename(tmp_path / f"moved-{attempt}")
            Path(db.parent).write_text("a file where the log's folder was")
            break
        except OSError:
            continue
    assert Path(db.parent).is_file()
    response = client.get("/metrics")
    assert response.status_code == 200 and b"process_resident_memory_bytes" in response.data
    m = scrape(client)
    assert sample(m, "rareml_log_writable") == 0


def test_raw_rows_with_the_columns_the_pipeline_dropped_are_scored_and_counted(client, model, test_frame, records):
    """A row straight from the user's table (target, time column, dropped columns included) is
    scored as its features alone; each ignored field is counted; a field the table never had is a 422."""
    ignored = list(model.schema.ignored)
    assert model.schema.target in ignored
    raw = {**records[0], **{name: 1 for name in ignored}}
    plain = post(client, "/predict", records[0]).get_json()
    got = post(client, "/predict", raw).get_json()
    assert got["probability"] == plain["probability"]
    batch = post(client, "/predict/batch", {"records": [raw, raw]}).get_json()["predictions"]
    columns = {k: [v, v] for k, v in raw.items()}
    by_column = post(client, "/predict/batch", {"columns": columns}).get_json()["predictions"]
    assert [p["probability"] for p in batch + by_column] == [plain["probability"]] * 4
    m = scrape(client)
    assert sample(m, "rareml_ignored_fields_total", field=model.schema.target) == 5
    refused = post(client, "/predict", raw | {"shoe_size": 44})
    assert refused.status_code == 422 and refused.get_json()["field"] == "shoe_size"
