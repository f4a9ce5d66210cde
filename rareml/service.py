"""What the API does, apart from HTTP: one `Service` holding the model being served, the
prediction log and the metrics, with one function per endpoint taking the raw body and giving the
answer (or raising ApiError). 04_serve.py's Flask routes and its /predict fast path are thin over
it, so both paths run the same checks and count the same way.

The model lives in one reference, `Service.served` (a `Served`: the model with what is derived
from it). A request reads it once and uses that object to the end, so replacing the reference
swaps the model for every later request while those in flight finish on theirs.
"""
from __future__ import annotations

import fcntl
import gc
import hmac
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from rareml import monitoring, orchestrator, registry
from rareml.errors import InputError, RareMLError
from rareml.features import RecordEncoder
from rareml.model import Model, load_model
from rareml.orchestrator import Airflow
from rareml.scoring import explanation
from rareml.store import (
    RAW_COLUMNS,
    RAW_ONE,
    RAW_RECORDS,
    DuplicateFeedback,
    LogUnavailable,
    Store,
    UnknownPrediction,
    alert_key,
    pack_request,
    wants_retrain,
)
from rareml.telemetry import Metrics, observe_many

log = logging.getLogger(__name__)
INTERNAL_ERROR = {"error": "internal error: the server log has the details", "reason": "internal", "field": None}
NON_FINITE = re.compile(rb"(?<![\w\"])-?(NaN|Infinity)(?![\w\"])")


class ApiError(Exception):
    """A client mistake (or a service that cannot answer now): `status` and a JSON message, counted by `reason`."""

    def __init__(self, status: int, reason: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.reason, self.field = status, reason, field


@dataclass(frozen=True)
class Served:
    """One loaded, verified and compiled model, with what the service derives from it."""

    model: Model
    encoder: RecordEncoder
    threshold: float
    version: str
    gate: dict | None = None  # the gate's decision that made it the champion (registry.gate_of)

    @classmethod
    def load(cls, model_dir: str | Path, threads: int | None = None) -> Served:
        """Load and verify the folder, ready each member's serving path and check it on the saved
        examples (a RareMLError on any problem); `threads`: threads per batch prediction."""
        model = load_model(model_dir)
        model.check()
        if threads:
            model.threads(threads)
        return cls(model, model.encoder, model.threshold, model.version, registry.gate_of(model_dir))


def parse_json(raw: bytes) -> object:
    """A request body as JSON, or an ApiError naming what is wrong with it."""
    if not raw.strip():
        raise ApiError(400, "empty_body", "the request body is empty: send a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "infinity" in str(exc) or NON_FINITE.search(raw):
            raise ApiError(422, "non_finite", "NaN and infinite numbers are not allowed: send null for an unknown "
                           "value") from None
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None


def query_int(text: str | None, name: str, default: int, low: int = 1, high: int = 100) -> int:
    """A query parameter as an integer clipped to [low, high], or a 422 naming the parameter."""
    if text is None:
        return default
    try:
        return max(low, min(int(text), high))
    except ValueError:
        raise ApiError(422, "wrong_type", f"{name} must be an integer", name) from None


@dataclass
class Service:
    """The model being served, the prediction log and the metrics, with one method per endpoint."""

    served: Served
    store: Store
    metrics: Metrics
    window: int = 1000
    refresh: float = 5.0
    max_batch: int = 5000
    alert_token: str | None = None
    orchestrator: Airflow | None = None  # RAREML_AIRFLOW_URL: retrain alerts start an Airflow run
    draining: object = None  # a callable: True once the server is shutting down (/ready says so)
    lock_path: Path | None = None
    _refreshed: float = 0.0
    _children: dict = field(default_factory=dict)
    _status_at: float = 0.0

    def score(self, rows: np.ndarray, extras: list[dict], served: Served, raw: bytes) -> list[dict]:
        """Score encoded rows with `served`, log them with `raw`, the request as sent (before
        answering: a prediction that cannot be made durable is refused with 503, never answered
        and lost) and count them."""
        unseen = served.encoder.unseen(rows)
        if unseen.any():
            for name, count in zip(served.encoder.names, unseen.sum(axis=0)):
                if count:
                    self.metrics.unseen.labels(name).inc(int(count))
        probability = served.model.predict_rows(np.where(unseen, np.nan, rows) if unseen.any() else rows)
        decision = (probability >= served.threshold).astype(int)
        try:
            ids = self.store.add_predictions(served.version, probability, decision, rows, extras, raw)
        except LogUnavailable as exc:
            raise ApiError(503, "log_unavailable", f"the prediction was not made: {exc}") from None
        positives = int(decision.sum())
        self.metrics.positives.inc(positives)
        self.metrics.negatives.inc(len(rows) - positives)
        if len(probability) == 1:
            self.metrics.probability.observe(float(probability[0]))
        else:
            observe_many(self.metrics.probability, probability)
        return [{"probability": p, "decision": d, "threshold": served.threshold, "model_version": served.version,
                 "prediction_id": i} for p, d, i in zip(probability.tolist(), decision.tolist(), ids)]

    def swap(self, served: Served) -> None:
        """Serve `served` from the next request on; requests in flight finish on the model they read."""
        replaced, self.served = self.served, served
        self.metrics.describe(served.model, replaced.model)

    def predict_one(self, body: bytes, explain: bool = False, top: int = 10) -> dict:
        """POST /predict: one JSON record."""
        served = self.served
        record = parse_json(body)
        row, extras = served.encoder.encode(record)
        self._count_ignored(served.encoder, record)
        result = self.score(row[None], [extras], served, pack_request(RAW_ONE, body))[0]
        if explain:
            result["explanation"] = explanation(served.model, row, record, top)
        return result

    def predict_batch(self, body: bytes) -> dict:
        """POST /predict/batch: {"records": [...]} or {"columns": {feature: [...]}}."""
        served, batch = self.served, parse_json(body)
        if not isinstance(batch, dict) or len(batch) != 1 or not (
                type(batch.get("records")) is list or "columns" in batch):
            raise ApiError(422, "not_a_batch", 'the body must be {"records": [ {...}, ... ]} '
                           'or {"columns": {"feature": [...], ...}}', "records")
        records, columns = batch.get("records"), batch.get("columns")
        where = "records" if records is not None else "columns"
        n = len(records) if records is not None else served.encoder.column_length(columns)
        if not n:
            raise ApiError(422, "empty_batch", "the batch is empty", where)
        if n > self.max_batch:
            raise ApiError(413, "batch_too_large", f"{n} records: at most {self.max_batch} per request", where)
        encoder = served.encoder
        rows, extras = encoder.encode_many(records) if records is not None else encoder.encode_columns(columns)
        self._count_ignored(encoder, records if records is not None else columns)
        raw = pack_request(RAW_RECORDS if records is not None else RAW_COLUMNS, body)
        return {"predictions": self.score(rows, extras, served, raw), "model_version": served.version}

    def _count_ignored(self, encoder: RecordEncoder, sent: object) -> None:
        """Count the fields the pipeline dropped that a client sent anyway (accepted, ignored), per row."""
        for name, count in encoder.ignored_counts(sent).items():
            self.metrics.ignored.labels(name).inc(count)

    def feedback(self, body: bytes) -> dict:
        """POST /feedback: the true outcome of an earlier prediction."""
        sent = parse_json(body)
        if not isinstance(sent, dict) or set(sent) - {"prediction_id", "label"}:
            raise ApiError(422, "not_feedback", 'the body must be {"prediction_id": str, "label": 0 or 1}')
        pid, label = sent.get("prediction_id"), sent.get("label")
        if not isinstance(pid, str):
            raise ApiError(422, "wrong_type", "prediction_id must be the string /predict returned", "prediction_id")
        if type(label) is not int or label not in (0, 1):
            raise ApiError(422, "wrong_type", "label must be 0 or 1", "label")
        try:
            self.store.add_feedback(pid, label)
        except UnknownPrediction:
            raise ApiError(404, "unknown_prediction", f"no prediction with id {pid!r}", "prediction_id") from None
        except DuplicateFeedback:
            raise ApiError(409, "duplicate_feedback", f"prediction {pid!r} already has a label",
                           "prediction_id") from None
        except LogUnavailable as exc:
            raise ApiError(503, "log_unavailable", f"the label was not recorded: {exc}", "prediction_id") from None
        self.metrics.feedback.labels(str(label)).inc()
        return {"prediction_id": pid, "label": label, "status": "recorded"}

    def receive_alerts(self, body: bytes, authorization: str) -> dict:
        """POST /alerts: Alertmanager's webhook."""
        self.authorize(authorization)
        payload = parse_json(body)
        alerts = alert_payload(payload)
        try:
            queued = self.store.add_alerts(alerts)
        except LogUnavailable as exc:
            raise ApiError(503, "log_unavailable", f"the alerts were not recorded: {exc}") from None
        for alert in alerts:
            self.metrics.alerts.labels(alert["labels"]["alertname"], alert["status"]).inc()
            log.warning("alert %s %s: %s", alert["labels"]["alertname"], alert["status"],
                        alert.get("annotations", {}).get("summary", ""))
        answer = {"recorded": len(alerts), "retrains_queued": queued}
        if self.orchestrator is not None:
            answer |= self.hand_off(payload.get("groupKey"), alerts)
        return answer

    def hand_off(self, group_key: object, alerts: list[dict]) -> dict:
        """The new retrain alerts of one notification, as one Airflow run (its id from the group's
        key and first start, so a repeat is a 409); on any failure they stay queued for the
        watcher and the failure is counted: an alert is never dropped."""
        wanted = [a for a in alerts if wants_retrain(a)]
        if not wanted:
            return {}
        starts = min(str(a.get("startsAt", "")) for a in wanted)
        group = group_key if isinstance(group_key, str) and group_key else ",".join(sorted(map(alert_key, wanted)))
        dag_run_id = orchestrator.run_id(group, starts)
        detail = {"dag_id": self.orchestrator.dag_id, "dag_run_id": dag_run_id}
        answer = {"result": "exists", "dag_run_id": dag_run_id}  # every one already handed off or claimed: a repeat
        try:
            keys = self.store.hand_off(list(dict.fromkeys(map(alert_key, wanted))), detail)
        except LogUnavailable as exc:  # recorded and queued above: the watcher will see them
            log.warning("retrain alerts not handed to Airflow (the log cannot be written): %s", exc)
            keys, answer = [], {"result": "failed", "reason": "log_unavailable"}
        if keys:
            conf = {"alert": {"alertname": ", ".join(sorted({a["labels"]["alertname"] for a in wanted})),
                              "alerts": keys, "group_key": group}, "alert_keys": keys}
            try:
                answer["result"] = self.orchestrator.trigger(dag_run_id, conf)
                log.warning("retraining handed to Airflow: %s run %s (%s)", self.orchestrator.dag_id, dag_run_id,
                            answer["result"])
            except orchestrator.OrchestratorUnavailable as exc:
                answer = {"result": "failed", "reason": str(exc)}
                try:
                    self.store.release(keys)
                except LogUnavailable as again:  # the alerts themselves are recorded; say what to do
                    log.error("retrain alerts %s neither handed to Airflow nor queued again: %s", keys, again)
                log.warning("retraining queued for the embedded watcher: %s", exc)
        self.metrics.handoffs.labels(answer["result"]).inc()
        return {"airflow": answer}

    def list_alerts(self, authorization: str, limit: str | None) -> dict:
        """GET /alerts: the latest alerts received."""
        self.authorize(authorization)
        try:
            n = query_int(limit, "limit", 100, high=1000)
            return {"alerts": self.store.alerts(n), "retrains": self.store.retrains(n)}
        except LogUnavailable as exc:
            raise ApiError(503, "log_unavailable", f"the alerts cannot be read: {exc}") from None

    def authorize(self, authorization: str) -> None:
        if not self.alert_token:
            raise ApiError(503, "webhook_disabled", "the alert webhook is off: start the API with RAREML_ALERT_TOKEN set")
        if not hmac.compare_digest(authorization.encode(), f"Bearer {self.alert_token}".encode()):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token for /alerts")

    def readiness(self) -> tuple[dict, int]:
        """GET /ready: 200 while predictions can be answered and logged, else 503 with the reason
        (never an absolute path: the answer may reach people who should not learn the layout)."""
        if self.draining is not None and self.draining():
            return {"status": "not ready", "reason": "the server is shutting down"}, 503
        status = self.store.status()
        if not status.writable:
            return {"status": "not ready", "reason": status.reason}, 503
        try:
            self.store.ping()
        except Exception as exc:  # noqa: BLE001 (any failure means: not ready)
            return {"status": "not ready", "reason": f"prediction log: {_no_paths(str(exc))}"}, 503
        return {"status": "ready", "model_version": self.served.version}, 200

    def card(self) -> dict:
        """GET /model: what is served, how good it is, and what it expects."""
        served = self.served
        model, m = served.model, served.model.manifest
        return {"name": m["name"], "model_version": served.version, "trained_at": m["trained_at"],
                "threshold": m["threshold"],
                "metrics": {k: m["metrics"][k] for k in ("test", "test_ci", "validation", "no_skill", "fairness")},
                "calibration": m["calibration"]["method"], "importance": m["importance"],
                "family": model.kind, "members": [{"family": x.family, "weight": x.weight} for x in model.members],
                "selection": m.get("selection"),
                "target": model.schema.target, "positive": model.schema.positive,
                "sensitive": list(model.schema.sensitive), "ignored": list(getattr(model.schema, "ignored", ())),
                "max_batch": self.max_batch, "features": model.schema.to_dict()["features"],
                "lineage": m.get("lineage"), "gate": served.gate}

    def exposition(self) -> bytes:
        """GET /metrics: always an answer. The window gauges are recomputed at most every
        `refresh` seconds; when the log cannot be read they keep their last values."""
        if time.monotonic() - self._refreshed >= self.refresh:
            try:
                self.refresh_signals()
            except Exception:
                log.exception("cannot compute the window gauges from the prediction log")
                self.metrics.refresh_failures.inc()
        self.update_log_status(force=True)
        return self.metrics.exposition()

    def refresh_signals(self) -> None:
        """Recompute the window gauges, one process at a time (the others keep the latest values)."""
        served = self.served
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            model = served.model
            self.metrics.update(monitoring.signals(model.schema, model.manifest["reference"],
                                                   self.store.window(served.version, self.window),
                                                   self.store.labeled(served.version, self.window)))
            for outcome, n in self.store.retrain_outcomes().items():
                self.metrics.retrains.labels(outcome).set(n)
            self._refreshed = time.monotonic()

    def update_log_status(self, force: bool = False) -> None:
        """The log's health as gauges, at most once a second per process (every scrape when forced)."""
        now = time.monotonic()
        if not force and now - self._status_at < 1.0:
            return
        self._status_at = now
        status = self.store.status()
        self.metrics.log_writable.set(1 if status.writable else 0)
        self.metrics.log_pending.set(status.pending_bytes)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request (both the Flask routes and the fast path call this)."""
        key = (endpoint, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.metrics.requests.labels(endpoint, str(status)),
                                              self.metrics.latency.labels(endpoint))
        children[0].inc()
        children[1].observe(seconds)
        self.update_log_status()

    def error(self, exc: Exception) -> tuple[dict, int]:
        """The JSON answer to an ApiError or InputError (a 4xx naming the problem, or a 503), counted."""
        if isinstance(exc, InputError):
            exc = ApiError(422, exc.reason, str(exc), exc.field)
        self.metrics.rejected.labels(exc.reason).inc()
        return {"error": str(exc), "reason": exc.reason, "field": exc.field}, exc.status


def _no_paths(text: str) -> str:
    """`text` with absolute paths cut to their last part."""
    return re.sub(r"(?<![\w.])/(?:[^\s/:'\"]+/)+([^\s/:'\"]+)", r"\1", text)


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


class Follower:
    """A worker's watch on the `champion` alias of an artifacts folder (rareml/registry.py): a new
    champion is loaded, its checksums verified, its trees compiled and checked against XGBoost, all
    in this thread while the old model serves, and only then swapped in (`Service.swap`). A model
    that fails any of it is refused (counted, logged once) and the old one keeps serving. With
    `mirror` (models:/NAME@ALIAS, a replica), one worker also brings MLflow's alias into the folder
    every few looks (registry.mirror); then every worker follows the folder as above."""

    MIRROR_EVERY = 5  # looks at the alias per look at MLflow's (--model-uri)

    def __init__(self, service: Service, root: Path, seconds: float = 2.0, threads: int | None = None,
                 mirror: str | None = None):
        self.service, self.root, self.seconds, self.threads = service, Path(root), seconds, threads
        self.refused: str | None = None  # the champion that failed: not tried again until the alias moves
        self.mirror, self.looks, self.mirror_lock, self.mirror_error = mirror, 0, None, None

    def start(self) -> Follower:
        threading.Thread(target=self._run, name="rareml-champion-follower", daemon=True).start()
        return self

    def _run(self) -> None:
        while True:
            time.sleep(self.seconds)
            try:
                self.check()
            except Exception:  # the follower must outlive any surprise; the old model keeps serving
                log.exception("cannot follow the champion in %s", self.root)

    def check(self) -> str | None:
        """One look at the alias: 'ok' if a new champion now serves, 'refused' if it failed, else None."""
        if self.mirror and self.looks % self.MIRROR_EVERY == 0 and self._mirrors():
            try:
                registry.mirror(self.root, self.mirror)
                self.mirror_error = None
            except Exception as exc:  # noqa: BLE001 (MLflow away, a bad download: the champion here serves)
                if str(exc) != self.mirror_error:
                    log.error("cannot mirror %s, %s keeps serving: %s", self.mirror, self.service.served.version, exc)
                self.mirror_error = str(exc)
        self.looks += 1
        version = registry.version_of(self.root, registry.CHAMPION)
        if version == self.service.served.version:
            self.refused = None  # the alias came back: a refused version, mended, may be tried again
        if version is None or version in (self.service.served.version, self.refused):
            return None
        try:  # the folder of the version read (the alias may move again meanwhile: next look)
            served = Served.load((self.root / registry.MODELS / version).resolve(), self.threads)
            if served.version != version:
                raise RareMLError(f"models/{version} holds model {served.version}")
        except Exception as exc:  # noqa: BLE001 (whatever is wrong with it, it does not serve)
            self.refused = version
            self.service.metrics.reloads.labels("refused").inc()
            log.error("new champion %s refused, %s keeps serving: %s", version, self.service.served.version, exc)
            return "refused"
        old = self.service.served.version
        self.service.swap(served)
        gc.freeze()  # the new model out of the cyclic collector's sight, as at start (04_serve.py: load)
        self.service.metrics.reloads.labels("ok").inc()
        log.info("now serving the new champion %s (was %s)", served.version, old)
        return "ok"

    def _mirrors(self) -> bool:
        """Whether this worker is the one that mirrors MLflow's alias (one per folder: the first to
        take the lock keeps it while it lives; the others only follow the local alias)."""
        if self.mirror_lock is None:
            lock = open(self.root / ".mirroring.lock", "w")  # noqa: SIM115 (held for the process's life)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                return False
            self.mirror_lock = lock
        return True
