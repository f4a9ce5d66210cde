"""The HTTP API (04_serve.py) end to end over the trained model: answers equal the model's own,
bad input is a 4xx naming the problem, the log survives restarts, /metrics counts what was sent
and its gauges see drift."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rareml import metrics as rm_metrics
from rareml.features import CATEGORICAL, NUMERIC, unseen_levels
from tests.api.conftest import sample, scrape

pytestmark = pytest.mark.slow  # needs the model the session trains with the real stages (~15 s, shared)

FIELDS = {"probability", "decision", "threshold", "model_version", "prediction_id"}


def post(client, path: str, body, **kwargs):
    return client.post(path, data=json.dumps(body), content_type="application/json", **kwargs)


def predict(client, record: dict) -> dict:
    response = post(client, "/predict", record)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def batch(client, records: list[dict]) -> list[dict]:
    response = post(client, "/predict/batch", {"records": records})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["predictions"]


def assert_error(response, status: int, reason: str | None = None, field: object = ...) -> dict:
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True)[:300])
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body["error"], str) and body["error"] and isinstance(body["reason"], str)
    if reason is not None:
        assert body["reason"] == reason, body
    if field is not ...:
        assert body.get("field") == field, body
    return body


# -- predictions ----------------------------------------------------------------------------------

def test_predict_answers_the_model_probability_and_decision(client, model, records, test_frame):
    everything = model.predict_proba(test_frame)
    rows = list(range(0, len(records), len(records) // 15)) + np.argsort(-everything)[:5].tolist()
    expected = everything[rows]
    ids, decisions = set(), []
    for i, p in zip(rows, expected):
        got = predict(client, records[i])
        assert set(got) == FIELDS
        np.testing.assert_allclose(got["probability"], p, rtol=1e-6)
        assert got["decision"] == int(got["probability"] >= model.threshold)
        assert got["threshold"] == model.threshold and got["model_version"] == model.version
        assert isinstance(got["prediction_id"], str) and got["prediction_id"] not in ids
        ids.add(got["prediction_id"])
        decisions.append(got["decision"])
    assert set(decisions) == {0, 1}


def test_plain_predict_skips_flask_and_answers_as_the_flask_route(make_app, records, tmp_path):
    """A plain POST /predict is answered by a WSGI fast path; a query string or a charset sends the
    same record through the Flask route: the same answer, counted the same way."""
    client = make_app(tmp_path / "p.db").test_client()
    fast = client.post("/predict", data=json.dumps(records[0]), content_type="application/json")
    routed = [client.post("/predict?explain=false", data=json.dumps(records[0]), content_type="application/json"),
              client.post("/predict", data=json.dumps(records[0]), content_type="application/json; charset=utf-8")]
    assert fast.status_code == 200 and fast.headers["Content-Type"] == "application/json"
    for response in routed:
        assert response.status_code == 200
        assert {k: v for k, v in response.get_json().items() if k != "prediction_id"} == {
            k: v for k, v in fast.get_json().items() if k != "prediction_id"}
    assert len({r.get_json()["prediction_id"] for r in [fast, *routed]}) == 3
    truncated = client.post("/predict", data=json.dumps(records[0])[:-5], content_type="application/json")
    assert truncated.status_code == 400 and truncated.get_json()["reason"] == "malformed_json"
    body, status = json.dumps(records[0]).encode(), []  # a body cut short of its Content-Length
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/predict", "SERVER_NAME": "localhost", "SERVER_PORT": "80",
               "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body[:20]),
               "wsgi.errors": io.StringIO(), "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body))}
    cut = json.loads(b"".join(client.application(environ, lambda s, headers: status.append(s))))
    assert status == ["400 BAD REQUEST"] and cut["reason"] == "incomplete_body"
    assert cut["error"] == f"the body ended after 20 of {len(body)} bytes"
    m = scrape(client)
    assert sample(m, "rareml_requests_total", endpoint="/predict", status="200") == 3
    assert sample(m, "rareml_requests_total", endpoint="/predict", status="400") == 2
    assert sample(m, "rareml_request_latency_seconds_count", endpoint="/predict") == 5


def test_record_key_order_does_not_matter(client, records):
    record = records[7]
    shuffled = dict(reversed(list(record.items())))
    assert predict(client, shuffled)["probability"] == predict(client, record)["probability"]


def test_explanation_adds_up_to_the_log_odds(client, model, records, test_frame):
    names = model.schema.names
    for i in (3, 1500):
        response = post(client, "/predict?explain=true&top=100", records[i])
        assert response.status_code == 200
        explanation = response.get_json()["explanation"]
        top = explanation["top"]
        assert sorted(t["feature"] for t in top) == sorted(names)  # top=100: every feature
        contributions = model.contributions(test_frame.iloc[[i]])[0]
        raw = model.raw_rows(model.rows(test_frame.iloc[[i]]))[0]
        log_odds = np.log(raw / (1 - raw))
        assert explanation["bias"] + sum(t["contribution"] for t in top) == pytest.approx(log_odds, abs=1e-4)
        assert explanation["bias"] == pytest.approx(contributions[-1], abs=1e-5)
        for t in top:
            assert t["contribution"] == pytest.approx(contributions[names.index(t["feature"])], abs=1e-5)
            assert t["value"] == records[i][t["feature"]]
        sizes = [abs(t["contribution"]) for t in top]
        assert sizes == sorted(sizes, reverse=True)
    assert len(post(client, "/predict?explain=true", records[3]).get_json()["explanation"]["top"]) == 10
    assert len(post(client, "/predict?explain=1&top=3", records[3]).get_json()["explanation"]["top"]) == 3
    assert "explanation" not in post(client, "/predict?explain=false", records[3]).get_json()
    assert_error(post(client, "/predict?explain=true&top=many", records[3]), 422, "wrong_type", "top")


@pytest.mark.parametrize("size", [5, 40])  # 5: the compiled trees; 40 (> Trees.SMALL): XGBoost
def test_batch_keeps_the_order_and_equals_single_predictions(client, model, records, test_frame, size):
    rows = np.random.default_rng(size).choice(len(records), size, replace=False)
    got = batch(client, [records[i] for i in rows])
    assert len(got) == size and all(set(g) == FIELDS for g in got)
    probabilities = np.array([g["probability"] for g in got])
    np.testing.assert_allclose(probabilities, model.predict_proba(test_frame.iloc[rows]), rtol=1e-6)
    singles = np.array([predict(client, records[i])["probability"] for i in rows])
    np.testing.assert_allclose(probabilities, singles, rtol=1e-6)
    assert [g["decision"] for g in got] == (probabilities >= model.threshold).astype(int).tolist()
    assert len({g["prediction_id"] for g in got}) == size


def test_batch_by_columns_equals_batch_by_records(client, records):
    chosen = records[:60]
    columns = {name: [r[name] for r in chosen] for name in chosen[0]}
    got = post(client, "/predict/batch", {"columns": columns})
    assert got.status_code == 200
    expected = batch(client, chosen)
    assert [p["probability"] for p in got.get_json()["predictions"]] == [p["probability"] for p in expected]
    assert all(set(p) == FIELDS for p in got.get_json()["predictions"])
    one = {name: [value] for name, value in records[0].items()}
    bad = one | {next(iter(one)): ["x"]}
    body = assert_error(post(client, "/predict/batch", {"columns": bad}), 422, "wrong_type", next(iter(one)))
    assert body["error"].startswith("row 0 of the columns: ")


def test_batch_limits(make_app, records):
    client = make_app(max_batch=3).test_client()
    assert len(batch(client, records[:3])) == 3
    assert_error(post(client, "/predict/batch", {"records": records[:4]}), 413, "batch_too_large", "records")
    assert_error(post(client, "/predict/batch", {"records": []}), 422, "empty_batch", "records")
    columns = {name: [r[name] for r in records[:4]] for name in records[0]}
    assert_error(post(client, "/predict/batch", {"columns": columns}), 413, "batch_too_large", "columns")
    assert_error(post(client, "/predict/batch", {"columns": {k: [] for k in columns}}), 422, "empty_batch", "columns")
    assert_error(post(client, "/predict/batch", {"columns": records[:2]}), 422, "not_columns", "columns")
    for body in ({"records": {}}, {"records": records[0]}, records[:2], {"rows": records[:2]},
                 {"records": records[:2], "extra": 1}, {"records": None}, "records",
                 {"records": records[:2], "columns": columns}):
        assert_error(post(client, "/predict/batch", body), 422, "not_a_batch", "records")


def test_batch_errors_name_the_record_and_field(client, records):
    bad = dict(records[2])
    bad["age"] = "forty"
    body = assert_error(post(client, "/predict/batch", {"records": [records[0], records[1], bad]}), 422,
                        "wrong_type", "age")
    assert body["error"].startswith("records[2]: ")
    body = assert_error(post(client, "/predict/batch", {"records": [records[0], 17]}), 422, "not_an_object")
    assert body["error"].startswith("records[1]")


def test_unseen_category_values_are_scored_as_missing_and_counted(client, model, records):
    categorical = [f.name for f in model.schema.features if f.kind == CATEGORICAL]
    record = dict(records[11]) | {name: "never seen in training" for name in categorical[:3]}
    got = predict(client, record)
    np.testing.assert_allclose(got["probability"], model.predict_proba([record]), rtol=1e-6)
    also = dict(records[12]) | {categorical[0]: 12345}  # a number that is no level
    np.testing.assert_allclose(predict(client, also)["probability"], model.predict_proba([also]), rtol=1e-6)
    m = scrape(client)
    expected = unseen_levels(pd.DataFrame([record, also]), model.schema)  # the training path's count
    assert expected[categorical[0]] == 2 and expected[categorical[1]] >= 1 and expected[categorical[2]] >= 1
    got_unseen = {dict(labels)["feature"]: value for (name, labels), value in m.items()
                  if name == "rareml_unseen_categories_total"}
    assert got_unseen == expected


# -- feedback -------------------------------------------------------------------------------------

def test_feedback_is_recorded_once_and_survives_a_restart(make_app, records, tmp_path):
    db = tmp_path / "log" / "p.db"
    client = make_app(db).test_client()
    first, second = predict(client, records[0])["prediction_id"], predict(client, records[1])["prediction_id"]
    response = post(client, "/feedback", {"prediction_id": first, "label": 1})
    assert response.status_code == 200
    assert response.get_json() == {"prediction_id": first, "label": 1, "status": "recorded"}
    assert_error(post(client, "/feedback", {"prediction_id": first, "label": 0}), 409, "duplicate_feedback",
                 "prediction_id")
    assert_error(post(client, "/feedback", {"prediction_id": "0" * 32, "label": 1}), 404, "unknown_prediction",
                 "prediction_id")
    assert_error(post(client, "/feedback", {"prediction_id": first + "x", "label": 1}), 404, "unknown_prediction")

    restarted = make_app(db).test_client()
    assert_error(post(restarted, "/feedback", {"prediction_id": first, "label": 1}), 409, "duplicate_feedback")
    assert post(restarted, "/feedback", {"prediction_id": second, "label": 0}).status_code == 200
    m = scrape(restarted)
    assert sample(m, "rareml_window_predictions") == 2 and sample(m, "rareml_window_labeled") == 2


def test_the_log_keeps_each_record_as_sent_new_levels_and_all(make_app, model, records, tmp_path):
    from rareml.store import Store

    db = tmp_path / "p.db"
    client = make_app(db).test_client()
    cat = next(f.name for f in model.schema.features if f.kind == "categorical")
    assert model.schema.ignored  # census drops columns: a record from the data file still carries them
    new_level = dict(records[0]) | {cat: "a level the model never saw", model.schema.ignored[0]: [1, 2]}
    pid_one = predict(client, new_level)["prediction_id"]
    pids = [p["prediction_id"] for p in post(client, "/predict/batch", {"records": records[1:3]}).get_json()["predictions"]]
    columns = {name: [r.get(name) for r in records[3:5]] for name in records[3]}
    pid_col = post(client, "/predict/batch", {"columns": columns}).get_json()["predictions"][1]["prediction_id"]
    for pid in (pid_one, pids[1], pid_col):
        assert post(client, "/feedback", {"prediction_id": pid, "label": 1}).status_code == 200
    got = Store(db, len(model.schema.features)).labelled_records()
    assert [g["record"] for g in got] == [new_level, records[2], records[4]]
    assert [g["prediction_id"] for g in got] == [pid_one, pids[1], pid_col]


@pytest.mark.parametrize("label", [2, -1, "1", "0", 0.5, 1.0, 0.0, None, [1], {"v": 1}, 10**30])
def test_feedback_label_must_be_0_or_1(client, records, label):
    pid = predict(client, records[0])["prediction_id"]
    assert_error(post(client, "/feedback", {"prediction_id": pid, "label": label}), 422, "wrong_type", "label")
    assert post(client, "/feedback", {"prediction_id": pid, "label": 0}).status_code == 200  # nothing was stored


def test_feedback_label_true_is_handled_consistently(client, records):
    """JSON true is == 1 in Python: the API either refuses it (as the encoder refuses booleans for
    numbers) or records it as 1, in the answer, the store and the metrics alike."""
    pid = predict(client, records[0])["prediction_id"]
    response = post(client, "/feedback", {"prediction_id": pid, "label": True})
    if response.status_code == 422:
        assert response.get_json()["field"] == "label"
        assert post(client, "/feedback", {"prediction_id": pid, "label": 1}).status_code == 200
    else:
        assert response.status_code == 200 and response.get_json()["label"] == 1
        assert_error(post(client, "/feedback", {"prediction_id": pid, "label": 1}), 409)
    m = scrape(client)
    assert sample(m, "rareml_feedback_total", label="1") == 1 and sample(m, "rareml_window_labeled") == 1


@pytest.mark.parametrize(("body", "field"), [
    ({"label": 1}, "prediction_id"), ({"prediction_id": 123, "label": 1}, "prediction_id"),
    ({"prediction_id": None, "label": 1}, "prediction_id"), ({"prediction_id": ["x"], "label": 1}, "prediction_id"),
])
def test_feedback_needs_a_string_id(client, body, field):
    assert_error(post(client, "/feedback", body), 422, "wrong_type", field)


@pytest.mark.parametrize("body", [[], ["a", 1], "text", 1, {"prediction_id": "x", "label": 1, "more": 2}])
def test_feedback_body_must_be_the_documented_object(client, body):
    assert_error(post(client, "/feedback", body), 422, "not_feedback")


# -- health, readiness, model card ----------------------------------------------------------------

def test_health_ready_and_model_card(client, model):
    assert client.get("/health").get_json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.get_json() == {"status": "ready", "model_version": model.version}
    card = client.get("/model").get_json()
    assert card["model_version"] == model.version and card["threshold"] == model.manifest["threshold"]
    assert card["sensitive"] == list(model.schema.sensitive) and card["target"] == model.schema.target
    features = {f["name"]: f for f in card["features"]}
    assert list(features) == model.schema.names
    for f in model.schema.features:
        assert features[f.name]["kind"] == f.kind in (NUMERIC, CATEGORICAL)
        assert features[f.name]["categories"] == list(f.categories)
        assert (len(f.categories) > 0) == (f.kind == CATEGORICAL)
    assert card["max_batch"] > 0 and card["metrics"]["test"]["average_precision"] > 0


def _folder_becomes_a_file(db):
    for attempt in range(50):  # the log's writer may recreate the folder in between: try again
        try:
            if db.parent.exists():
                db.parent.rename(db.parent.with_name(f"moved-{attempt}"))
            db.parent.write_text("a regular file where the prediction log's folder was")
            return
        except OSError:
            continue
    raise AssertionError("could not replace the log's folder by a file")


def _file_is_not_a_database(db):
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(b"this is not an SQLite database" * 100)


@pytest.mark.parametrize("damage", [_folder_becomes_a_file, _file_is_not_a_database])
def test_not_ready_when_the_log_is_unusable(make_app, records, tmp_path, damage):
    db = tmp_path / "serving" / "p.db"
    client = make_app(db).test_client()
    damage(db)
    response = client.get("/ready")
    assert response.status_code == 503 and response.get_json()["status"] == "not ready"
    assert "prediction log" in response.get_json()["reason"]
    assert client.get("/health").status_code == 200  # alive, not ready
    answer = post(client, "/predict", records[0])
    if damage is _folder_becomes_a_file:  # no journal either: refused, never a fake success
        assert answer.status_code == 503 and answer.get_json()["reason"] == "log_unavailable"
    else:  # the journal has it, until the log can be written again (or the backlog bound refuses)
        assert answer.status_code == 200 and client.application.extensions["rareml"].store.status().pending_requests



def test_not_ready_when_the_log_disappears_while_serving(make_app, records, tmp_path):
    client = make_app(tmp_path / "serving" / "p.db").test_client()
    predict(client, records[0])
    _folder_becomes_a_file(tmp_path / "serving" / "p.db")
    assert client.get("/ready").status_code == 503


def test_unknown_paths_and_methods_answer_json(client):
    assert_error(client.get("/nope"), 404)
    assert_error(client.get("/predict"), 405)
    assert_error(client.post("/health"), 405)


# -- metrics --------------------------------------------------------------------------------------

def test_metrics_count_what_was_sent(client, model, records):
    sent = [records[0], records[1], records[2] | {"education": "Martian school"}]
    answers = [predict(client, r) for r in sent] + batch(client, records[3:7])
    sent += records[3:7]
    post(client, "/feedback", {"prediction_id": answers[0]["prediction_id"], "label": 1})
    post(client, "/feedback", {"prediction_id": answers[1]["prediction_id"], "label": 0})
    post(client, "/feedback", {"prediction_id": "f" * 32, "label": 1})
    post(client, "/predict", {k: v for k, v in records[0].items() if k != "age"})
    client.post("/predict", data=b"{", content_type="application/json")
    client.post("/predict", data=json.dumps(records[0]), content_type="text/plain")
    client.get("/nope")

    m = scrape(client)
    requests = {tuple(dict(labels)[k] for k in ("endpoint", "status")): value for (name, labels), value in m.items()
                if name == "rareml_requests_total"}
    assert requests == {("/predict", "200"): 3, ("/predict/batch", "200"): 1, ("/feedback", "200"): 2,
                        ("/feedback", "404"): 1, ("/predict", "422"): 1, ("/predict", "400"): 1,
                        ("/predict", "415"): 1, ("unmatched", "404"): 1}
    decisions = [a["decision"] for a in answers]
    for d in ("0", "1"):
        assert (sample(m, "rareml_predictions_total", decision=d) or 0) == decisions.count(int(d))
    assert sample(m, "rareml_feedback_total", label="1") == 1 and sample(m, "rareml_feedback_total", label="0") == 1
    rejected = {dict(labels)["reason"]: value for (name, labels), value in m.items()
                if name == "rareml_rejected_inputs_total"}
    assert rejected == {"unknown_prediction": 1, "missing_field": 1, "malformed_json": 1, "wrong_content_type": 1}
    unseen = {dict(labels)["feature"]: value for (name, labels), value in m.items()
              if name == "rareml_unseen_categories_total"}
    assert unseen == unseen_levels(pd.DataFrame(sent), model.schema) and unseen["education"] >= 1
    probabilities = [a["probability"] for a in answers]
    assert sample(m, "rareml_predicted_probability_count") == 7
    assert sample(m, "rareml_predicted_probability_sum") == pytest.approx(sum(probabilities))
    assert sample(m, "rareml_predicted_probability_bucket", le="+Inf") == 7
    assert sample(m, "rareml_window_predictions") == 7 and sample(m, "rareml_window_labeled") == 2
    assert sample(m, "rareml_positive_rate") == pytest.approx(np.mean(decisions))
    assert sample(m, "rareml_threshold") == model.threshold
    assert sample(m, "rareml_model_info", name=model.manifest["name"], version=model.version,
                  trained_at=model.manifest["trained_at"], calibration=model.calibrator.method) == 1
    assert sample(m, "rareml_request_latency_seconds_count", endpoint="/predict") == 6
    again = scrape(client)
    assert sample(again, "rareml_requests_total", endpoint="/metrics", status="200") == 1


def test_no_drift_in_distribution_and_drift_on_a_shifted_feature(make_app, model, records, tmp_path):
    chosen = np.random.default_rng(0).choice(len(records), 600, replace=False)
    calm = make_app(tmp_path / "calm.db").test_client()
    batch(calm, [records[i] for i in chosen])
    m = scrape(calm)
    psi = {dict(labels)["feature"]: value for (name, labels), value in m.items() if name == "rareml_feature_psi"}
    assert set(psi) == set(model.schema.names)
    assert sample(m, "rareml_feature_psi_max") == max(psi.values()) < 0.25, psi
    assert math.isfinite(sample(m, "rareml_prediction_psi"))
    assert sample(m, "rareml_window_predictions") == 600

    shifted = make_app(tmp_path / "shifted.db").test_client()
    batch(shifted, [records[i] | {"age": records[i]["age"] + 40} for i in chosen])
    m = scrape(shifted)
    assert sample(m, "rareml_feature_psi", feature="age") > 0.5
    assert sample(m, "rareml_feature_psi_max") == sample(m, "rareml_feature_psi", feature="age")
    assert sample(m, "rareml_feature_psi", feature="education") < 0.25  # the others did not move


def test_no_prediction_drift_in_distribution(make_app, records, tmp_path):
    client = make_app(tmp_path / "calm.db").test_client()
    batch(client, [records[i] for i in np.random.default_rng(0).choice(len(records), 1000, replace=False)])
    assert scrape(client)[("rareml_prediction_psi", ())] < 0.1


def test_window_keeps_the_latest_predictions(make_app, records, tmp_path):
    client = make_app(tmp_path / "w.db", window=50).test_client()
    batch(client, records[:30])
    batch(client, [r | {"age": r["age"] + 40} for r in records[30:90]])
    m = scrape(client)
    assert sample(m, "rareml_window_predictions") == 50
    assert sample(m, "rareml_feature_psi", feature="age") > 0.5  # only shifted rows are in the window


def test_live_performance_and_fairness_appear_with_feedback(client, model, records, test_frame):
    before = scrape(client)
    assert sample(before, "rareml_window_labeled") in (0, None)
    rows = np.random.default_rng(1).choice(len(records), 300, replace=False)
    rows = np.concatenate([rows, np.flatnonzero(test_frame["_label"].to_numpy() == 1)[:40]])
    rows = np.unique(rows)
    answers = batch(client, [records[i] for i in rows])
    m = scrape(client)
    assert math.isnan(sample(m, "rareml_live_metric", metric="precision"))
    labels = test_frame["_label"].to_numpy()[rows]
    for a, y in zip(answers, labels):
        assert post(client, "/feedback", {"prediction_id": a["prediction_id"], "label": int(y)}).status_code == 200
    m = scrape(client)
    decision = np.array([a["decision"] for a in answers])
    probability = np.array([a["probability"] for a in answers])
    assert sample(m, "rareml_window_labeled") == len(rows)
    assert sample(m, "rareml_live_metric", metric="precision") == pytest.approx(labels[decision == 1].mean())
    assert sample(m, "rareml_live_metric", metric="recall") == pytest.approx(decision[labels == 1].mean())
    assert sample(m, "rareml_live_metric", metric="average_precision") == pytest.approx(
        rm_metrics.average_precision(labels, probability), rel=1e-6)
    sex = test_frame["sex"].to_numpy()[rows]
    for group in set(sex):
        if (sex == group).sum() >= 20:
            assert sample(m, "rareml_group_selection_rate", attribute="sex", group=group) == pytest.approx(
                decision[sex == group].mean())
    rates = [decision[sex == g].mean() for g in set(sex) if (sex == g).sum() >= 20]
    assert sample(m, "rareml_fairness_selection_rate_difference", attribute="sex") == pytest.approx(
        max(rates) - min(rates))


# -- bad input ------------------------------------------------------------------------------------

def _valid_body(records) -> dict:
    return dict(records[0])


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


BAD_BODIES = [
    # (id, endpoint, body: bytes or a function of a valid record, content type, status, reason, field)
    ("empty", "/predict", b"", "application/json", 400, "empty_body", None),
    ("blank", "/predict", b"  \n ", "application/json", 400, "empty_body", None),
    ("malformed", "/predict", b'{"age": 3', "application/json", 400, "malformed_json", None),
    ("trailing garbage", "/predict", lambda r: json.dumps(r).encode() + b"}", "application/json", 400,
     "malformed_json", None),
    ("not utf-8", "/predict", b'{"age": "\xff\xfe"}', "application/json", 400, "malformed_json", None),
    ("wrong content type", "/predict", lambda r: json.dumps(r).encode(), "text/plain", 415, "wrong_content_type", None),
    ("form content type", "/predict", b"age=3", "application/x-www-form-urlencoded", 415, "wrong_content_type", None),
    ("no content type", "/predict", lambda r: json.dumps(r).encode(), None, 415, "wrong_content_type", None),
    ("json array", "/predict", lambda r: json.dumps([r]).encode(), "application/json", 422, "not_an_object", None),
    ("json string", "/predict", b'"hello"', "application/json", 422, "not_an_object", None),
    ("json null", "/predict", b"null", "application/json", 422, "not_an_object", None),
    ("NaN literal", "/predict", lambda r: json.dumps(r | {"age": math.nan}).encode(), "application/json", 422,
     "non_finite", (None, "age")),
    ("Infinity literal", "/predict", lambda r: json.dumps(r | {"wage_per_hour": math.inf}).encode(),
     "application/json", 422, "non_finite", (None, "wage_per_hour")),
    ("-Infinity literal", "/predict", lambda r: json.dumps(r | {"age": -math.inf}).encode(), "application/json", 422,
     "non_finite", (None, "age")),
    ("huge number 1e999", "/predict", lambda r: json.dumps(r).replace('"age": ' + json.dumps(r["age"]),
                                                                      '"age": 1e999').encode(),
     "application/json", 422, "non_finite", (None, "age")),
    ("huge integer", "/predict", lambda r: json.dumps(r | {"age": 10**400}).encode(), "application/json", 422,
     "non_finite", (None, "age")),
    ("nested garbage", "/predict", lambda r: json.dumps(r | {"age": {"a": [1, {"b": None}]}}).encode(),
     "application/json", 422, "wrong_type", "age"),
    ("string for numeric", "/predict", lambda r: json.dumps(r | {"age": "42"}).encode(), "application/json", 422,
     "wrong_type", "age"),
    ("bool for numeric", "/predict", lambda r: json.dumps(r | {"age": True}).encode(), "application/json", 422,
     "wrong_type", "age"),
    ("list for categorical", "/predict", lambda r: json.dumps(r | {"education": ["x"]}).encode(), "application/json",
     422, "wrong_type", "education"),
    ("missing field", "/predict", lambda r: json.dumps({k: v for k, v in r.items() if k != "education"}).encode(),
     "application/json", 422, "missing_field", "education"),
    ("extra field", "/predict", lambda r: json.dumps(r | {"shoe_size": 44}).encode(), "application/json", 422,
     "extra_field", "shoe_size"),
    ("deeply nested array", "/predict", _deep(100_000), "application/json", 400, "malformed_json", None),
    ("deeply nested field", "/predict", lambda r: json.dumps(r).replace('"age": ' + json.dumps(r["age"]), '"age": '
                                                                        + _deep(100_000).decode()).encode(),
     "application/json", 400, "malformed_json", None),
    ("batch: deeply nested", "/predict/batch", _deep(100_000), "application/json", 400, "malformed_json", None),
    ("batch: NaN inside", "/predict/batch", lambda r: json.dumps({"records": [r, r | {"age": math.nan}]}).encode(),
     "application/json", 422, "non_finite", (None, "age")),
    ("batch: wrong content type", "/predict/batch", lambda r: json.dumps({"records": [r]}).encode(), "text/json",
     415, "wrong_content_type", None),
    ("feedback: empty", "/feedback", b"", "application/json", 400, "empty_body", None),
    ("feedback: malformed", "/feedback", b'{"prediction_id": ', "application/json", 400, "malformed_json", None),
    ("feedback: deeply nested", "/feedback", _deep(100_000), "application/json", 400, "malformed_json", None),
    ("feedback: NaN label", "/feedback", b'{"prediction_id": "x", "label": NaN}', "application/json", 422,
     "non_finite", (None, "label")),
]


@pytest.mark.parametrize(("endpoint", "body", "content_type", "status", "reason", "field"),
                         [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_are_a_4xx_naming_the_problem(client, records, endpoint, body, content_type, status, reason, field):
    data = body(_valid_body(records)) if callable(body) else body
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post(endpoint, data=data, headers=headers)
    answer = assert_error(response, status, reason)
    if isinstance(field, tuple):
        assert answer.get("field") in field
    else:
        assert answer.get("field") == field
    if answer.get("field"):
        assert answer["field"] in answer["error"]


def test_body_larger_than_the_limit_is_413(client, serve, records):
    big = b'{"records": [' + b" " * serve.MAX_BODY + b"]}"
    assert_error(client.post("/predict/batch", data=big, content_type="application/json"), 413, "body_too_large")
    m = scrape(client)
    assert sample(m, "rareml_rejected_inputs_total", reason="body_too_large") == 1


FLOAT32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("value", [1e300, -1e39])
def test_numbers_beyond_float32_are_refused_on_every_path(client, records, value):
    record = records[0] | {"wage_per_hour": value}
    answers = [post(client, "/predict", record), post(client, "/predict?explain=true", record),
               post(client, "/predict/batch", {"records": [record] * 40})]
    assert [a.status_code for a in answers] == [422] * 3
    assert all(a.get_json()["reason"] == "out_of_range" and a.get_json()["field"] == "wage_per_hour" for a in answers)


def test_a_numeric_minus_one_is_a_number(client, model, records):
    record = records[0] | {"wage_per_hour": -1, "capital_gains": -1, "age": -1}
    predict(client, record)
    m = scrape(client)
    assert not [labels for (name, labels) in m if name == "rareml_unseen_categories_total"]


@pytest.mark.parametrize("suffix", ["-\u00b2", "-" + "9" * 30, "-" + "9" * 5000])
def test_malformed_prediction_ids_are_unknown(client, records, suffix):
    pid = predict(client, records[0])["prediction_id"]
    assert_error(post(client, "/feedback", {"prediction_id": pid.rsplit("-", 1)[0] + suffix, "label": 1}), 404)


# -- fuzz -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_client(serve, model_dir, tmp_path_factory):
    app = serve.create_app(model_dir, tmp_path_factory.mktemp("fuzz") / "p.db", refresh=3600, max_batch=50)
    return app.test_client()


BIG = 1e300
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(-BIG, BIG),
                         st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
# Values of the right kind reach the scoring code instead of stopping at validation.
numbers = st.one_of(st.none(), st.floats(-BIG, BIG), st.integers(-(2**70), 2**70), st.sampled_from([-1, 0, -0.0]))
levels = st.one_of(st.none(), st.text(max_size=10), st.integers(-(2**70), 2**70), st.floats(-BIG, BIG), st.booleans())


def _check(response, allowed=(200,)) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    if response.status_code >= 400:
        body = response.get_json(silent=True)
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("reason"), str), \
            response.get_data(as_text=True)[:300]
        assert body.get("field") is None or isinstance(body["field"], str)
    else:
        assert response.status_code in allowed


@st.composite
def mutated_records(draw, records, kinds, well_typed=False):
    """A record of the test split with some fields given another value of their kind, or (unless
    well_typed) dropped or given any JSON value, and maybe unknown fields."""
    record = dict(draw(st.sampled_from(records[:200])))
    for name in draw(st.lists(st.sampled_from(sorted(record)), max_size=6, unique=True)):
        action = "kind" if well_typed else draw(st.sampled_from(["drop", "kind", "any"]))
        if action == "drop":
            record.pop(name)
        elif action == "kind":
            record[name] = draw(numbers if kinds.get(name) == NUMERIC else levels)
        else:
            record[name] = draw(json_values)
    if not well_typed and draw(st.integers(0, 4)) == 0:
        record.update(draw(st.dictionaries(st.text(max_size=20), json_values, max_size=2)))
    return record


@st.composite
def batches(draw, records, kinds):
    """Mostly plain records with a few mutated ones among them, past Model.SMALL (the XGBoost path) or not."""
    items = draw(st.lists(st.sampled_from(records[:200]), min_size=1, max_size=45))
    for _ in range(draw(st.integers(0, 3))):
        mutated = draw(st.one_of(mutated_records(records, kinds, well_typed=True), mutated_records(records, kinds),
                                 json_values))
        items.insert(draw(st.integers(0, len(items))), mutated)
    return items


FUZZ = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])


def _kinds(model) -> dict[str, str]:
    return {f.name: f.kind for f in model.schema.features}


def test_fuzz_predict_with_random_records(fuzz_client, model, records):
    statuses = set()

    @FUZZ
    @given(st.one_of(mutated_records(records, _kinds(model), well_typed=True), mutated_records(records, _kinds(model))),
           st.sampled_from(["", "?explain=true", "?explain=true&top=3"]))
    def check(record, query):
        response = post(fuzz_client, "/predict" + query, record)
        _check(response)
        statuses.add(response.status_code)
        if response.status_code == 200:
            assert set(response.get_json()) - {"explanation"} == FIELDS

    check()
    assert {200, 422} <= statuses  # the fuzz reached both answers


def test_fuzz_batch_with_random_records(fuzz_client, model, records):
    @FUZZ
    @given(batches(records, _kinds(model)), st.sampled_from(["records", "records", "rows", "columns"]))
    def check(items, key):
        if key == "columns":  # the same items column by column (a non-object item leaves a ragged column)
            names = list(dict.fromkeys(k for item in items if isinstance(item, dict) for k in item))
            body = {"columns": {k: [item[k] for item in items if isinstance(item, dict) and k in item] for k in names}}
        else:
            body = {key: items}
        response = post(fuzz_client, "/predict/batch", body)
        _check(response)
        statuses.add(response.status_code)
        if response.status_code == 200:  # column by column, the non-object items are not rows at all
            rows = len(next(iter(body["columns"].values()), [])) if key == "columns" else len(items)
            assert len(response.get_json()["predictions"]) == rows

    statuses = set()
    check()
    assert {200, 422} <= statuses


def test_fuzz_any_json_and_any_bytes_on_every_endpoint(fuzz_client, records):
    valid_id = predict(fuzz_client, records[0])["prediction_id"]
    ids = st.one_of(st.just(valid_id), st.text(max_size=40), st.text(alphabet="0123456789abcdef-", max_size=40),
                    st.integers(0, 10**6).map(lambda i: valid_id.rsplit("-", 1)[0] + f"-{i}"), json_values,
                    st.sampled_from(["-\u00b2", "-01", "-" + "9" * 30]).map(lambda s: valid_id.rsplit("-", 1)[0] + s))

    @FUZZ
    @given(st.sampled_from(["/predict", "/predict/batch", "/feedback"]), st.one_of(
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries({"prediction_id": ids, "label": json_values}).map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries({}, optional={"prediction_id": ids, "label": st.sampled_from([0, 1]), "x": json_values})
        .map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200)),
        st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", ""]))
    def check(endpoint, body, content_type):
        response = fuzz_client.post(endpoint, data=body, headers={"Content-Type": content_type} if content_type else {})
        _check(response)
        statuses.add(response.status_code)

    statuses = set()
    check()
    assert {400, 415, 422} <= statuses
    _check(fuzz_client.get("/metrics"))
