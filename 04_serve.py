"""Stage 4: serve the model over HTTP: a Flask app (`create_app`) run by gunicorn (`main`).

Endpoints: POST /predict, /predict/batch, /feedback; GET /health, /ready, /model, /metrics,
/openapi.json, /docs; and POST /alerts (Alertmanager's webhook, bearer token from
RAREML_ALERT_TOKEN), GET /alerts. What each does is `rareml.service.Service`; this file is the
HTTP around it: one Blueprint per group of endpoints, one frozen `Settings` built once from the
arguments and the environment, and a WSGI fast path for plain POST /predict that calls the same
`Service.predict_one` and counts the same way. gunicorn runs it with `rareml.server` (requests
read whole before a thread sees them, a drain on SIGTERM). See the README for a curl call per endpoint.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import orjson
from flask import Blueprint, Flask, Response, current_app, g, request
from flask.json.provider import JSONProvider
from werkzeug.exceptions import HTTPException

from rareml import openapi, registry
from rareml.cli import run
from rareml.errors import InputError, RareMLError
from rareml.model import verify_model_dir
from rareml.monitoring import FAIRNESS_BOUND
from rareml.orchestrator import Airflow
from rareml.service import INTERNAL_ERROR, ApiError, Follower, Served, Service, query_int
from rareml.store import Store
from rareml.telemetry import Metrics

log = logging.getLogger("04_serve")
MAX_BATCH = 5000  # records per /predict/batch; more is a 413
MAX_BODY = 16 * 2**20  # bytes per request body; more is a 413
WINDOW = 1000  # recent predictions (and recent labels) behind the drift, fairness and live gauges
JSON_HEADERS = [("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff")]


@dataclass(frozen=True)
class Settings:
    """Everything the API is told, read once at the edge (arguments, environment) and passed down."""

    model_dir: Path = Path("artifacts/model")
    db: Path = Path("artifacts/serving/predictions.db")
    window: int = WINDOW
    refresh: float = 5.0  # seconds between recomputing the window gauges
    max_batch: int = MAX_BATCH
    threads: int | None = None  # XGBoost threads per batch prediction (cores / workers)
    alert_token: str | None = None  # the shared secret of POST /alerts (RAREML_ALERT_TOKEN)
    orchestrator: Airflow | None = None  # RAREML_AIRFLOW_URL: retrain alerts start an Airflow DAG run
    fairness_bound: float = FAIRNESS_BOUND
    fast_path: bool = True  # plain POST /predict without Flask (RAREML_FAST_PATH=0 turns it off)
    retention: float | None = None  # seconds of predictions the log keeps (None: all)
    follow: Path | None = None  # an artifacts folder whose champion each worker follows (hot swap)
    reload_seconds: float = 2.0  # how often a worker looks at the champion alias (0: never)
    model_uri: str | None = None  # models:/NAME@ALIAS in MLflow, mirrored into the artifacts folder (replicas)
    # the server (main)
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    worker_threads: int = 4  # threads per worker, each answering one whole request at a time
    drain: float = 5.0  # seconds between SIGTERM and the stop, /ready answering 503
    read_timeout: float = 15.0  # seconds for a client to send a whole request

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: dict | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        model_dir = registry.serving_dir(args.artifacts)  # the champion (rareml/registry.py)
        champion = registry.version_of(args.artifacts, registry.CHAMPION)
        db = args.db or args.artifacts / "serving" / "predictions.db"
        return cls(**given | {
            "model_dir": model_dir, "follow": args.artifacts if champion else None, "db": db,
            "threads": max(1, (os.cpu_count() or 1) // args.workers),
            "alert_token": environ.get("RAREML_ALERT_TOKEN") or None,
            # the retraining DAG works on what this API serves and logs
            "orchestrator": Airflow.from_env(environ, {"artifacts": str(Path(args.artifacts).resolve()),
                                                       "db": str(Path(db).resolve())}),
            "fast_path": environ.get("RAREML_FAST_PATH", "1") not in ("0", "false", "no"),
            "retention": args.retention_days * 86400 if args.retention_days else None})


class FastJSON(JSONProvider):
    """Flask's JSON through orjson (NaN written as null, so every answer is valid JSON)."""

    def dumps(self, obj, **kwargs) -> str:
        return orjson.dumps(obj).decode()

    def loads(self, s, **kwargs):
        return orjson.loads(s)

    def response(self, *args, **kwargs) -> Response:
        obj = args[0] if len(args) == 1 else (args or kwargs)
        return Response(orjson.dumps(obj), mimetype="application/json")


def service() -> Service:
    return current_app.extensions["rareml"]


def read_body() -> bytes:
    """The request's raw JSON body, or an ApiError: wrong type, too large, cut short."""
    if request.mimetype != "application/json":
        raise ApiError(415, "wrong_content_type", f"Content-Type must be application/json, got "
                       f"{request.mimetype or 'none'!r}")
    return body_bytes(request.environ)


def body_bytes(environ: dict) -> bytes:
    """The raw body of a WSGI request, at most MAX_BODY bytes (413 past that, chunked or not; 400
    when shorter than its Content-Length). gunicorn's wsgi.input reads 1 KiB at a time with a
    buffer copy each time (7 ms of a 1,000-record batch): its reader underneath is read in one call."""
    length = environ.get("CONTENT_LENGTH") or ""
    stream = environ["wsgi.input"]
    if type(getattr(stream, "reader", None)).__name__ == "LengthReader":
        stream = stream.reader
    if length.isdigit():
        if int(length) > MAX_BODY:
            raise ApiError(413, "body_too_large", f"the body is larger than {MAX_BODY} bytes")
        data = stream.read(int(length))
        if len(data) != int(length):
            raise ApiError(400, "incomplete_body", f"the body ended after {len(data)} of {length} bytes")
        return data
    data = stream.read(MAX_BODY + 1)  # chunked, or no length given
    if len(data) > MAX_BODY:
        raise ApiError(413, "body_too_large", f"the body is larger than {MAX_BODY} bytes")
    return data


predict = Blueprint("predict", __name__)
feedback = Blueprint("feedback", __name__)
alerts = Blueprint("alerts", __name__)
operations = Blueprint("operations", __name__)


@predict.post("/predict")
def predict_one():
    explain = request.args.get("explain", "").lower() in ("1", "true", "yes")
    answer = service().predict_one(read_body(), explain, query_int(request.args.get("top"), "top", 10))
    g.model_version = answer["model_version"]  # the model that answered, if a swap came meanwhile
    return answer


@predict.post("/predict/batch")
def predict_batch():
    answer = service().predict_batch(read_body())
    g.model_version = answer["model_version"]
    return answer


@feedback.post("/feedback")
def record_feedback():
    return service().feedback(read_body())


@alerts.post("/alerts")
def receive_alerts():
    return service().receive_alerts(read_body(), request.headers.get("Authorization", ""))


@alerts.get("/alerts")
def list_alerts():
    return service().list_alerts(request.headers.get("Authorization", ""), request.args.get("limit"))


@operations.get("/health")
def health():
    return {"status": "ok"}


@operations.get("/ready")
def ready():
    return service().readiness()


@operations.get("/model")
def model_card():
    return service().card()


@operations.get("/metrics")
def metrics():
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(service().exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(settings: Settings | str | Path = Settings(), db: str | Path | None = None, lifecycle=None,
               **options) -> Flask:
    """The API over one verified model folder (a RareMLError if it is missing or corrupt).
    `settings`: a Settings, or the model folder with `db` and any Settings field as keywords.
    `lifecycle`: what the server shares with its workers (rareml.server.Lifecycle: draining)."""
    if not isinstance(settings, Settings):
        settings = Settings(Path(settings), Path(db) if db else Settings.db, **options)
    elif db or options:
        settings = replace(settings, **({"db": Path(db)} if db else {}) | options)
    served = Served.load(settings.model_dir, settings.threads)
    store = Store(settings.db, len(served.model.schema.names), retention=settings.retention)
    svc = Service(served, store, Metrics(served.model, settings.fairness_bound), settings.window, settings.refresh,
                  settings.max_batch, settings.alert_token, settings.orchestrator,
                  draining=(lambda: lifecycle.draining) if lifecycle is not None else None,
                  lock_path=Path(settings.db).with_suffix(".lock"))
    app = Flask("rareml")
    app.json = FastJSON(app)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.extensions["rareml"] = svc
    for blueprint in (predict, feedback, alerts, operations,
                      openapi.blueprint(lambda: svc.served,
                                        lambda served: openapi.document(served.model, max_batch=svc.max_batch))):
        app.register_blueprint(blueprint)
    _hooks(app, svc)
    if settings.fast_path:
        app.wsgi_app = fast_predict(app.wsgi_app, svc)
    if settings.follow and settings.reload_seconds > 0:
        Follower(svc, settings.follow, settings.reload_seconds, settings.threads, mirror=settings.model_uri).start()
    return app


def _hooks(app: Flask, svc: Service) -> None:
    """Timing, counting, headers and errors: every answer is JSON (but /metrics and /docs), never a
    traceback, and a 500 only for our own faults."""

    @app.before_request
    def start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def count(response: Response) -> Response:
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Model-Version"] = g.get("model_version") or svc.served.version
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        svc.observe(endpoint, response.status_code, time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    @app.errorhandler(ApiError)
    @app.errorhandler(InputError)
    def client_error(exc):
        return svc.error(exc)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.code == 413:
            return svc.error(ApiError(413, "body_too_large", f"the body is larger than {MAX_BODY} bytes"))
        return {"error": exc.description, "reason": exc.name.lower().replace(" ", "_"), "field": None}, exc.code

    @app.errorhandler(Exception)
    def server_error(exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return INTERNAL_ERROR, 500


def fast_predict(flask_app, svc: Service):
    """POST /predict, plain (JSON body, no query string), answered without Flask: its request and
    response objects, routing and hooks cost ~0.1 ms, as much as the trees. The same
    `Service.predict_one`, the same error answers and the same counting as the Flask route;
    anything else goes to the Flask app."""

    def predict_fast(environ, start_response):
        if (environ["REQUEST_METHOD"] != "POST" or environ.get("PATH_INFO") != "/predict"
                or environ.get("QUERY_STRING") or environ.get("CONTENT_TYPE") != "application/json"):
            return flask_app(environ, start_response)
        started = time.perf_counter()
        try:
            answer, status = svc.predict_one(body_bytes(environ)), 200
        except (ApiError, InputError) as exc:
            answer, status = svc.error(exc)
        except Exception:  # as the Flask app's handler does: logged, a JSON 500
            log.exception("unexpected error on POST /predict")
            answer, status = INTERNAL_ERROR, 500
        body = orjson.dumps(answer)
        start_response(f"{status} {_REASONS.get(status, 'ERROR')}", [
            *JSON_HEADERS, ("X-Model-Version", answer.get("model_version") or svc.served.version),
            ("Content-Length", str(len(body)))])
        svc.observe("/predict", status, time.perf_counter() - started)
        return [body]

    return predict_fast


_REASONS = {200: "OK", 400: "BAD REQUEST", 413: "REQUEST ENTITY TOO LARGE", 415: "UNSUPPORTED MEDIA TYPE",
            422: "UNPROCESSABLE ENTITY", 500: "INTERNAL SERVER ERROR", 503: "SERVICE UNAVAILABLE"}


def _child_exit(store_args):
    def hook(server, worker) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
        try:  # what the dead worker answered but had not written, now, not when a label asks for it
            Store(*store_args).replay()
        except Exception:
            log.exception("cannot replay the journal of worker %d", worker.pid)

    return hook


def _metrics_dir() -> str:
    """A fresh folder for the workers' metric files (counts start at zero with each server), made
    by us: inside PROMETHEUS_MULTIPROC_DIR when the user set one, which is never emptied or removed."""
    parent = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if parent:
        os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix="rareml-metrics-", dir=parent or None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default="artifacts", type=Path, help="folder holding the champion (make serialize)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a container)")
    parser.add_argument("--port", default=8000, type=int)
    parser.add_argument("--workers", default=2, type=int, help="gunicorn worker processes")
    parser.add_argument("--worker-threads", dest="worker_threads", default=Settings.worker_threads, type=int,
                        help="threads per worker, each answering one whole request at a time")
    parser.add_argument("--db", type=Path, help="prediction log (default: ARTIFACTS/serving/predictions.db)")
    parser.add_argument("--window", default=WINDOW, type=int, help="predictions behind the live gauges")
    parser.add_argument("--refresh", default=5.0, type=float, help="seconds between recomputing the live gauges")
    parser.add_argument("--fairness-bound", dest="fairness_bound", default=FAIRNESS_BOUND, type=float,
                        help="largest acceptable gap in selection or true-positive rate between groups")
    parser.add_argument("--retention-days", type=float, help="keep this many days of predictions (default: all)")
    parser.add_argument("--drain", default=Settings.drain, type=float,
                        help="seconds between SIGTERM and the stop, /ready answering 503 meanwhile")
    parser.add_argument("--reload-seconds", dest="reload_seconds", default=Settings.reload_seconds, type=float,
                        help="how often each worker looks for a new champion to swap in (0: never)")
    parser.add_argument("--read-timeout", dest="read_timeout", default=Settings.read_timeout, type=float,
                        help="seconds a client has to send a whole request (then 408)")
    parser.add_argument("--model-uri", dest="model_uri", default=os.environ.get("RAREML_MODEL_URI") or None,
                        help="follow this MLflow alias, models:/NAME@champion (RAREML_MODEL_URI; MLflow at "
                             "MLFLOW_TRACKING_URI), mirrored into ARTIFACTS: a replica on another machine")
    args = parser.parse_args(argv)
    if args.model_uri:
        try:
            log.info("champion from %s: %s", args.model_uri, registry.mirror(args.artifacts, args.model_uri))
        except RareMLError as exc:
            before = registry.version_of(args.artifacts, registry.CHAMPION)
            if before is None:
                raise
            log.warning("%s: serving the champion mirrored here before, %s", exc, before)
    settings = Settings.from_args(args)
    serve(settings)


def serve(settings: Settings) -> None:
    """Check the model and the log, then run gunicorn until it is stopped."""
    from rareml.server import BufferedWorker, Lifecycle, Server

    manifest = verify_model_dir(settings.model_dir)  # refuse to start on a missing or corrupt model, with the reason
    store_args = (settings.db, len(manifest["schema"]["features"]))
    try:
        store = Store(*store_args)
        store.ping()
        replayed = store.replay()  # predictions answered before a crash, still in their journals
    except (OSError, sqlite3.Error) as exc:
        raise RareMLError(f"cannot open the prediction log {settings.db}: {exc}") from None
    if replayed:
        log.warning("recovered %d answered predictions from the journals of processes that did not stop cleanly",
                    replayed)
    metrics_dir = _metrics_dir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    log.info("serving model %s from %s on http://%s:%d with %d workers x %d threads (prediction log %s)",
             manifest["model_version"], settings.model_dir, settings.host, settings.port, settings.workers,
             settings.worker_threads, settings.db)
    if not settings.alert_token:
        log.info("RAREML_ALERT_TOKEN is not set: the /alerts webhook answers 503")
    elif settings.orchestrator:
        log.info("retrain alerts start the Airflow DAG %s at %s (the embedded queue if it cannot be reached)",
                 settings.orchestrator.dag_id, settings.orchestrator.url)
    lifecycle = Lifecycle()
    worker = type("Worker", (BufferedWorker,), {"read_timeout": settings.read_timeout, "max_body": MAX_BODY})

    def load():
        app = create_app(settings, lifecycle=lifecycle)
        # the model, Flask and the libraries live as long as the worker: moved out of the collector's
        # sight, a full collection no longer walks them (1.4 ms of every 1,000-record batch)
        gc.collect()
        gc.freeze()
        return app

    master = os.getpid()
    try:
        Server(load, {
            "bind": f"{settings.host}:{settings.port}", "workers": settings.workers, "worker_class": worker,
            "threads": settings.worker_threads, "timeout": 60, "graceful_timeout": 30, "keepalive": 5,
            "child_exit": _child_exit(store_args), "accesslog": None, "errorlog": "-", "loglevel": "info",
            "proc_name": "rareml-serve", "control_socket_disable": True}, lifecycle, settings.drain).run()
    finally:
        # a worker that exits (SIGTERM, gunicorn's timeout abort) unwinds through here too, from the fork:
        # only the master removes the folder, or the workers it starts next cannot boot and it stops
        if os.getpid() == master:
            shutil.rmtree(metrics_dir, ignore_errors=True)  # ours: made by _metrics_dir for this server


if __name__ == "__main__":
    run(main)
