"""Stage 4: serve the model over HTTP: a Flask app (`create_app`) run by gunicorn (`main`).

Endpoints: POST /predict, /predict/batch, /feedback; GET /health, /ready, /model, /metrics; and
POST /alerts (Alertmanager's webhook, bearer token from RAREML_ALERT_TOKEN), GET /alerts.
Records are checked against the model's schema and encoded by the same code as training
(rareml.features); predictions and delayed labels go to a SQLite log shared by all workers, from
which drift, fairness and live performance are computed over a sliding window when Prometheus
scrapes, at most every `refresh` seconds. See the README for a curl call per endpoint.
"""
from __future__ import annotations

import argparse
import fcntl
import gc
import hmac
import io
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
from flask import Flask, Response, g, request
from flask.json.provider import JSONProvider
from werkzeug.exceptions import HTTPException

from rareml import monitoring
from rareml.cli import run
from rareml.errors import InputError, RareMLError
from rareml.model import load_model, verify_model_dir
from rareml.scoring import explanation
from rareml.store import DuplicateFeedback, Store, UnknownPrediction
from rareml.telemetry import Metrics, observe_many

log = logging.getLogger("04_serve")
MAX_BATCH = 5000  # records per /predict/batch; more is a 413
MAX_BODY = 16 * 2**20  # bytes per request body; more is a 413
FAIRNESS_BOUND = 0.2  # largest selection-rate or true-positive-rate gap between groups before the alert
INTERNAL_ERROR = {"error": "internal error: the server log has the details", "reason": "internal", "field": None}
SHORT_BODY = "rareml.short_body"  # environ key the /predict fast path sets: bytes read of a body cut short
WINDOW = 1000  # recent predictions (and recent labels) behind the drift, fairness and live gauges


class ApiError(Exception):
    """A client mistake: answered with `status` and a JSON message, counted by `reason`."""

    def __init__(self, status: int, reason: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.reason, self.field = status, reason, field


def read_body() -> object:
    """The request's JSON body, or an ApiError naming what is wrong with it."""
    if request.mimetype != "application/json":
        raise ApiError(415, "wrong_content_type", f"Content-Type must be application/json, got "
                       f"{request.mimetype or 'none'!r}")
    raw = _body_bytes()
    if not raw.strip():
        raise ApiError(400, "empty_body", "the request body is empty: send a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "infinity" in str(exc) or NON_FINITE.search(raw):
            raise ApiError(422, "non_finite", "NaN and infinite numbers are not allowed: send null for an unknown "
                           "value") from None
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None


def _body_bytes() -> bytes:
    """The raw body. gunicorn's wsgi.input reads a body 1 KiB at a time with a buffer copy each
    time (7 ms of a 1,000-record batch); its length reader underneath takes the whole body in one
    call. Anything else (the Flask test client, another server) goes through Flask."""
    length = request.content_length
    if SHORT_BODY in request.environ:  # the /predict fast path read it already
        raise ApiError(400, "incomplete_body", f"the body ended after {request.environ[SHORT_BODY]} of {length} bytes")
    reader = getattr(request.environ.get("wsgi.input"), "reader", None)
    if type(reader).__name__ == "LengthReader" and length is not None and length <= MAX_BODY:
        data = reader.read(length)
        if len(data) == length:
            return data
        raise ApiError(400, "incomplete_body", f"the body ended after {len(data)} of {length} bytes")
    return request.get_data(cache=False)


NON_FINITE = re.compile(rb"(?<![\w\"])-?(NaN|Infinity)(?![\w\"])")


class FastJSON(JSONProvider):
    """Flask's JSON through orjson (NaN written as null, so every answer is valid JSON)."""

    def dumps(self, obj, **kwargs) -> str:
        return orjson.dumps(obj).decode()

    def loads(self, s, **kwargs):
        return orjson.loads(s)

    def response(self, *args, **kwargs) -> Response:
        obj = args[0] if len(args) == 1 else (args or kwargs)
        return Response(orjson.dumps(obj), mimetype="application/json")


def create_app(model_dir: str | Path = "artifacts/model", db: str | Path = "artifacts/serving/predictions.db",
               window: int = WINDOW, refresh: float = 5.0, max_batch: int = MAX_BATCH, threads: int | None = None,
               alert_token: str | None = None, fairness_bound: float = FAIRNESS_BOUND) -> Flask:
    """The API over one verified model folder (a RareMLError if it is missing or corrupt).
    `threads`: XGBoost threads per batch prediction; with several workers, cores / workers, so
    that concurrent batches share the cores instead of fighting over them. `alert_token`: the
    shared secret Alertmanager sends to POST /alerts (the webhook is off without one)."""
    model = load_model(model_dir)
    model.compile()
    if threads:
        model.booster.set_param({"nthread": threads})
    encoder, store, metrics = model.encoder, Store(db, len(model.schema.names)), Metrics(model, fairness_bound)
    threshold, version = model.threshold, model.version
    names = np.array(model.schema.names)
    lock_path = Path(db).with_suffix(".lock")
    state = {"refreshed": 0.0}
    app = Flask("rareml")
    app.json = FastJSON(app)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    def score(rows: np.ndarray, extras: list[dict]) -> list[dict]:
        unseen = encoder.unseen(rows)
        if unseen.any():
            for name, count in zip(names, unseen.sum(axis=0)):
                if count:
                    metrics.unseen.labels(name).inc(int(count))
        probability = model.predict_rows(np.where(unseen, np.nan, rows) if unseen.any() else rows)
        decision = (probability >= threshold).astype(int)
        ids = store.add_predictions(version, probability, decision, rows, extras)
        positives = int(decision.sum())
        metrics.positives.inc(positives)
        metrics.negatives.inc(len(rows) - positives)
        if len(probability) == 1:
            metrics.probability.observe(float(probability[0]))
        else:
            observe_many(metrics.probability, probability)
        return [{"probability": p, "decision": d, "threshold": threshold, "model_version": version,
                 "prediction_id": i} for p, d, i in zip(probability.tolist(), decision.tolist(), ids)]

    @app.post("/predict")
    def predict():
        explained = request.args.get("explain", "").lower() in ("1", "true", "yes")
        top = _top(request.args.get("top", "10"))
        record = read_body()
        row, extras = encoder.encode(record)
        result = score(row[None], [extras])[0]
        if explained:
            result["explanation"] = explanation(model, row, record, top)
        return result

    @app.post("/predict/batch")
    def predict_batch():
        body = read_body()
        if not isinstance(body, dict) or len(body) != 1 or not (
                type(body.get("records")) is list or "columns" in body):
            raise ApiError(422, "not_a_batch", 'the body must be {"records": [ {...}, ... ]} '
                           'or {"columns": {"feature": [...], ...}}', "records")
        records, columns = body.get("records"), body.get("columns")
        n = len(records) if records is not None else encoder.column_length(columns)
        if not n:
            raise ApiError(422, "empty_batch", "the batch is empty", "records" if records is not None else "columns")
        if n > max_batch:
            raise ApiError(413, "batch_too_large", f"{n} records: at most {max_batch} per request",
                           "records" if records is not None else "columns")
        rows, extras = encoder.encode_many(records) if records is not None else encoder.encode_columns(columns)
        return {"predictions": score(rows, extras), "model_version": version}

    @app.post("/feedback")
    def feedback():
        body = read_body()
        if not isinstance(body, dict) or set(body) - {"prediction_id", "label"}:
            raise ApiError(422, "not_feedback", 'the body must be {"prediction_id": str, "label": 0 or 1}')
        pid, label = body.get("prediction_id"), body.get("label")
        if not isinstance(pid, str):
            raise ApiError(422, "wrong_type", "prediction_id must be the string /predict returned", "prediction_id")
        if type(label) is not int or label not in (0, 1):
            raise ApiError(422, "wrong_type", "label must be 0 or 1", "label")
        try:
            store.add_feedback(pid, int(label))
        except UnknownPrediction:
            raise ApiError(404, "unknown_prediction", f"no prediction with id {pid!r}", "prediction_id") from None
        except DuplicateFeedback:
            raise ApiError(409, "duplicate_feedback", f"prediction {pid!r} already has a label",
                           "prediction_id") from None
        metrics.feedback.labels(str(int(label))).inc()
        return {"prediction_id": pid, "label": int(label), "status": "recorded"}

    @app.post("/alerts")
    def alerts_webhook():
        authorize()
        alerts = alert_payload(read_body())
        store.add_alerts(alerts)
        for alert in alerts:
            metrics.alerts.labels(alert["labels"]["alertname"], alert["status"]).inc()
            log.warning("alert %s %s: %s", alert["labels"]["alertname"], alert["status"],
                        alert.get("annotations", {}).get("summary", ""))
        return {"recorded": len(alerts)}

    @app.get("/alerts")
    def alerts_list():
        authorize()
        return {"alerts": store.alerts(_top(request.args.get("limit", "100")))}

    def authorize() -> None:
        if not alert_token:
            raise ApiError(503, "webhook_disabled", "the alert webhook is off: start the API with RAREML_ALERT_TOKEN set")
        sent = request.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {alert_token}".encode()):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token for /alerts")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/ready")
    def ready():
        try:
            store.ping()
        except Exception as exc:  # noqa: BLE001 (any failure means: not ready)
            return {"status": "not ready", "reason": f"prediction log {db}: {exc}"}, 503
        return {"status": "ready", "model_version": version}

    @app.get("/model")
    def model_card():
        m = model.manifest
        return {"name": m["name"], "model_version": version, "trained_at": m["trained_at"], "threshold": m["threshold"],
                "metrics": {k: m["metrics"][k] for k in ("test", "test_ci", "validation", "no_skill", "fairness")},
                "calibration": m["calibration"]["method"], "importance": m["importance"],
                "target": model.schema.target, "positive": model.schema.positive,
                "sensitive": list(model.schema.sensitive), "max_batch": max_batch,
                "features": model.schema.to_dict()["features"]}

    @app.get("/metrics")
    def metrics_endpoint():
        if time.monotonic() - state["refreshed"] >= refresh:
            refresh_signals()
        return Response(metrics.exposition(), mimetype="text/plain; version=0.0.4; charset=utf-8")

    def refresh_signals() -> None:
        """Recompute the window gauges, one process at a time (the others keep the latest values)."""
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            metrics.update(monitoring.signals(model.schema, model.manifest["reference"], store.window(version, window),
                                              store.labeled(version, window)))
            state["refreshed"] = time.monotonic()

    @app.before_request
    def start_timer():
        g.started = time.perf_counter()

    children: dict[tuple[str, int], tuple] = {}  # labelled metrics, looked up once per endpoint and status

    @app.after_request
    def count(response: Response) -> Response:
        key = (request.url_rule.rule if request.url_rule else "unmatched", response.status_code)
        if key not in children:
            children[key] = (metrics.requests.labels(key[0], str(key[1])), metrics.latency.labels(key[0]))
        requests_, latency = children[key]
        requests_.inc()
        latency.observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        metrics.rejected.labels(exc.reason).inc()
        return {"error": str(exc), "reason": exc.reason, "field": exc.field}, exc.status

    @app.errorhandler(InputError)
    def input_error(exc: InputError):
        return api_error(ApiError(422, exc.reason, str(exc), exc.field))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.code == 413:
            return api_error(ApiError(413, "body_too_large", f"the body is larger than {MAX_BODY} bytes"))
        return {"error": exc.description, "reason": exc.name.lower().replace(" ", "_"), "field": None}, exc.code

    @app.errorhandler(Exception)
    def server_error(exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return INTERNAL_ERROR, 500

    app.wsgi_app = _fast_predict(app.wsgi_app, encoder, score, metrics)
    return app


def _fast_predict(flask_app, encoder, score, metrics):
    """POST /predict, plain (JSON body, no query string) and valid, answered without Flask: its
    request and response objects, routing and hooks cost ~0.1 ms, as much as the trees. Anything
    else, a bad body included, goes to the Flask app, which answers and counts it as before."""
    ok, latency = metrics.requests.labels("/predict", "200"), metrics.latency.labels("/predict")
    headers = [("Content-Type", "application/json")]

    def wsgi_app(environ, start_response):
        length = environ.get("CONTENT_LENGTH") or ""
        if (environ["REQUEST_METHOD"] != "POST" or environ.get("PATH_INFO") != "/predict"
                or environ.get("QUERY_STRING") or environ.get("CONTENT_TYPE") != "application/json"
                or not length.isdigit() or int(length) > MAX_BODY):
            return flask_app(environ, start_response)
        started = time.perf_counter()
        stream = environ["wsgi.input"]
        body = getattr(stream, "reader", stream).read(int(length))  # gunicorn: its length reader, in one call
        if len(body) != int(length):
            environ[SHORT_BODY] = len(body)  # Flask answers with the lengths
            return flask_app(environ, start_response)
        try:
            row, extras = encoder.encode(orjson.loads(body))
        except (orjson.JSONDecodeError, InputError):
            environ["wsgi.input"] = io.BytesIO(body)  # Flask reads it again and names the problem
            return flask_app(environ, start_response)
        try:
            answer, status = orjson.dumps(score(row[None], [extras])[0]), "200 OK"
        except Exception:  # as the Flask app's handler does: logged, a JSON 500
            log.exception("unexpected error on POST /predict")
            answer, status = orjson.dumps(INTERNAL_ERROR), "500 INTERNAL SERVER ERROR"
        requests_ = ok if status == "200 OK" else metrics.requests.labels("/predict", "500")
        requests_.inc()
        latency.observe(time.perf_counter() - started)
        start_response(status, [*headers, ("Content-Length", str(len(answer)))])
        return [answer]

    return wsgi_app


def alert_payload(body: object) -> list[dict]:
    """The alerts of an Alertmanager webhook body (version 4), checked field by field."""
    if not isinstance(body, dict) or not isinstance(body.get("alerts"), list) or not body["alerts"]:
        raise ApiError(422, "not_alerts", 'the body must be an Alertmanager webhook payload: {"version": "4", '
                       '"alerts": [...]}', "alerts")
    if body.get("version", "4") != "4":
        raise ApiError(422, "wrong_version", f"webhook payload version {body.get('version')!r}: expected \"4\"",
                       "version")
    if len(body["alerts"]) > 1000:
        raise ApiError(413, "too_many_alerts", "at most 1000 alerts per request", "alerts")
    for i, alert in enumerate(body["alerts"]):
        where = f"alerts[{i}]"
        if not isinstance(alert, dict) or alert.get("status") not in ("firing", "resolved"):
            raise ApiError(422, "not_an_alert", f'{where}.status must be "firing" or "resolved"', f"{where}.status")
        labels = alert.get("labels")
        if not isinstance(labels, dict) or not isinstance(labels.get("alertname"), str) or \
                not all(isinstance(v, str) for v in labels.values()):
            raise ApiError(422, "not_an_alert", f"{where}.labels must map names to strings, alertname included",
                           f"{where}.labels")
        if not isinstance(alert.get("annotations", {}), dict):
            raise ApiError(422, "not_an_alert", f"{where}.annotations must be an object", f"{where}.annotations")
        for key in ("startsAt", "fingerprint"):
            if not isinstance(alert.get(key, ""), str):
                raise ApiError(422, "not_an_alert", f"{where}.{key} must be a string", f"{where}.{key}")
    return body["alerts"]


def _top(text: str) -> int:
    try:
        return max(1, min(int(text), 100))
    except ValueError:
        raise ApiError(422, "wrong_type", "top must be an integer", "top") from None


def _gunicorn(app_factory, options: dict):
    """gunicorn, configured in code: one command line, and the multiprocess metrics hook."""
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):
        def load_config(self):
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):
            app = app_factory()
            # the model, Flask and the libraries live as long as the worker: moved out of the
            # collector's sight, a full collection no longer walks them (1.4 ms of every 1,000-record
            # batch, whose parsed JSON triggers several)
            gc.collect()
            gc.freeze()
            return app

    return Server()


def _child_exit(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default="artifacts", type=Path, help="folder holding model/ (make serialize)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a container)")
    parser.add_argument("--port", default=8000, type=int)
    parser.add_argument("--workers", default=2, type=int, help="gunicorn worker processes")
    parser.add_argument("--db", type=Path, help="prediction log (default: ARTIFACTS/serving/predictions.db)")
    parser.add_argument("--window", default=WINDOW, type=int, help="predictions behind the live gauges")
    parser.add_argument("--refresh", default=5.0, type=float, help="seconds between recomputing the live gauges")
    parser.add_argument("--fairness-bound", default=FAIRNESS_BOUND, type=float,
                        help="largest acceptable gap in selection or true-positive rate between groups")
    args = parser.parse_args(argv)
    model_dir, db = args.artifacts / "model", args.db or args.artifacts / "serving" / "predictions.db"
    manifest = verify_model_dir(model_dir)  # refuse to start on a missing or corrupt model, with the reason
    try:
        Store(db, len(manifest["schema"]["features"])).ping()
    except (OSError, sqlite3.Error) as exc:
        raise RareMLError(f"cannot open the prediction log {db}: {exc}") from None
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="rareml-metrics-")
    shutil.rmtree(metrics_dir, ignore_errors=True)  # counts start at zero with each server
    os.makedirs(metrics_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    log.info("serving model %s from %s on http://%s:%d with %d workers (prediction log %s)", manifest["model_version"],
             model_dir, args.host, args.port, args.workers, db)
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    alert_token = os.environ.get("RAREML_ALERT_TOKEN")  # the shared secret of POST /alerts (Alertmanager)
    if not alert_token:
        log.info("RAREML_ALERT_TOKEN is not set: the /alerts webhook answers 503")
    _gunicorn(lambda: create_app(
        model_dir, db, args.window, args.refresh, threads=threads, alert_token=alert_token,
        fairness_bound=args.fairness_bound), {
        "bind": f"{args.host}:{args.port}", "workers": args.workers, "worker_class": "sync", "timeout": 60,
        "child_exit": _child_exit, "accesslog": None, "errorlog": "-", "loglevel": "info",
        "proc_name": "rareml-serve", "control_socket_disable": True}).run()


if __name__ == "__main__":
    run(main)
