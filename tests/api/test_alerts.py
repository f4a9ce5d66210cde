"""POST /alerts: Alertmanager's webhook, where automatic retraining will start. Authenticated by a
shared token, validated, persisted, counted."""
from __future__ import annotations

import pytest

from tests.api.conftest import scrape

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def payload(*alerts: dict) -> dict:
    """A body shaped as Alertmanager (v0.25) sends it."""
    return {"version": "4", "groupKey": "{}:{alertname=\"RareMLDataDrift\"}", "status": "firing",
            "receiver": "rareml", "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
            "externalURL": "http://127.0.0.1:9093", "truncatedAlerts": 0, "alerts": list(alerts)}


def alert(name: str = "RareMLDataDrift", status: str = "firing", **labels: str) -> dict:
    return {"status": status, "labels": {"alertname": name, "severity": "warning", **labels},
            "annotations": {"summary": "feature drift"}, "startsAt": "2026-11-26T16:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://127.0.0.1:9090/graph", "fingerprint": "abc123"}


@pytest.fixture
def webhook(make_app):
    return make_app(alert_token=TOKEN).test_client()


def test_alerts_are_recorded_counted_and_listed(webhook):
    sent = payload(alert(), alert("RareMLLiveRecallLow", feature="age"), alert(status="resolved"))
    response = webhook.post("/alerts", json=sent, headers=AUTH)
    assert response.status_code == 200 and response.get_json() == {"recorded": 3, "retrains_queued": 0}
    listed = webhook.get("/alerts", headers=AUTH).get_json()["alerts"]
    assert [(a["alertname"], a["status"]) for a in listed] == [
        ("RareMLDataDrift", "resolved"), ("RareMLLiveRecallLow", "firing"), ("RareMLDataDrift", "firing")]
    assert listed[1]["labels"]["feature"] == "age" and listed[2]["annotations"]["summary"] == "feature drift"
    m = scrape(webhook)
    assert m[("rareml_alerts_received_total", (("alertname", "RareMLDataDrift"), ("status", "firing")))] == 1
    assert m[("rareml_alerts_received_total", (("alertname", "RareMLDataDrift"), ("status", "resolved")))] == 1


def test_alerts_survive_a_restart(make_app, tmp_path):
    first = make_app(db=tmp_path / "a.db", alert_token=TOKEN).test_client()
    assert first.post("/alerts", json=payload(alert()), headers=AUTH).status_code == 200
    again = make_app(db=tmp_path / "a.db", alert_token=TOKEN).test_client()
    assert len(again.get("/alerts", headers=AUTH).get_json()["alerts"]) == 1


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_a_missing_or_wrong_token_is_refused(webhook, headers):
    response = webhook.post("/alerts", json=payload(alert()), headers=headers)
    assert response.status_code == 401 and response.get_json()["reason"] == "unauthorized"
    assert webhook.get("/alerts", headers=headers).status_code == 401
    assert webhook.get("/alerts", headers=AUTH).get_json()["alerts"] == []


def test_without_a_token_the_webhook_is_off(client):
    response = client.post("/alerts", json=payload(alert()), headers=AUTH)
    assert response.status_code == 503 and "RAREML_ALERT_TOKEN" in response.get_json()["error"]


@pytest.mark.parametrize(("body", "field"), [
    ({}, "alerts"), ({"alerts": []}, "alerts"), ([1], "alerts"),
    (payload(alert()) | {"version": "3"}, "version"),
    (payload({"labels": {"alertname": "X"}}), "alerts[0].status"),
    (payload(alert() | {"labels": {"severity": "warning"}}), "alerts[0].labels"),
    (payload(alert() | {"labels": {"alertname": "X", "n": 1}}), "alerts[0].labels"),
    (payload(alert(), alert() | {"annotations": []}), "alerts[1].annotations"),
    (payload(alert() | {"startsAt": 5}), "alerts[0].startsAt"),
])
def test_a_bad_payload_names_the_field_and_records_nothing(webhook, body, field):
    response = webhook.post("/alerts", json=body, headers=AUTH)
    assert response.status_code == 422 and response.get_json()["field"] == field
    assert webhook.get("/alerts", headers=AUTH).get_json()["alerts"] == []


def test_firing_retrain_alerts_are_queued_once_each_and_listed(webhook):
    drift = alert(retrain="true")
    sent = payload(drift, alert("RareMLHighLatency"), alert(status="resolved", retrain="true"))
    assert webhook.post("/alerts", json=sent, headers=AUTH).get_json() == {"recorded": 3, "retrains_queued": 1}
    # Alertmanager repeats a notification: same fingerprint and start, nothing new to do
    assert webhook.post("/alerts", json=payload(drift), headers=AUTH).get_json()["retrains_queued"] == 0
    again = drift | {"startsAt": "2026-11-27T09:00:00Z"}  # the same alert firing anew: a new retraining
    assert webhook.post("/alerts", json=payload(again), headers=AUTH).get_json()["retrains_queued"] == 1
    retrains = webhook.get("/alerts", headers=AUTH).get_json()["retrains"]
    assert [(r["alertname"], r["alert"], r["outcome"], r["started"]) for r in retrains] == [
        ("RareMLDataDrift", "abc123@2026-11-27T09:00:00Z", None, None),
        ("RareMLDataDrift", "abc123@2026-11-26T16:00:00Z", None, None)]
    assert scrape(webhook)[("rareml_retrains", (("outcome", "queued"),))] == 2


def test_with_airflow_unreachable_a_retrain_alert_stays_queued_for_the_watcher_and_the_failure_is_counted(make_app):
    from rareml.orchestrator import Airflow
    from rareml.processes import free_port

    down = Airflow(f"http://127.0.0.1:{free_port()}", "admin", "pw", timeout=1.0)  # nothing listens there
    client = make_app(alert_token=TOKEN, orchestrator=down).test_client()
    answer = client.post("/alerts", json=payload(alert(retrain="true")), headers=AUTH)
    assert answer.status_code == 200, answer.get_json()
    body = answer.get_json()
    assert body["retrains_queued"] == 1 and body["airflow"]["result"] == "failed"
    assert "cannot be reached" in body["airflow"]["reason"]
    queued = client.get("/alerts", headers=AUTH).get_json()["retrains"]
    assert [(r["outcome"], r["started"], r["attempts"]) for r in queued] == [(None, None, 0)]  # the watcher's to claim
    assert scrape(client)[("rareml_orchestrator_triggers_total", (("result", "failed"),))] == 1
    # a second delivery of the same alert: still one queued retraining, Airflow asked again
    again = client.post("/alerts", json=payload(alert(retrain="true")), headers=AUTH).get_json()
    assert again["retrains_queued"] == 0 and again["airflow"]["result"] == "failed"
    assert len(client.get("/alerts", headers=AUTH).get_json()["retrains"]) == 1


def test_alerts_without_retrain_label_never_reach_airflow(make_app):
    from rareml.orchestrator import Airflow

    never = Airflow("http://127.0.0.1:9", "admin", "pw", timeout=1.0)
    client = make_app(alert_token=TOKEN, orchestrator=never).test_client()
    body = client.post("/alerts", json=payload(alert()), headers=AUTH).get_json()
    assert body == {"recorded": 1, "retrains_queued": 0}
