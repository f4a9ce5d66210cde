"""Starting a retraining in Apache Airflow when an alert arrives (RAREML_AIRFLOW_URL set).

POST /alerts hands each new retrain="true" alert to Airflow's REST API v2: a JWT from
`/auth/token`, then `POST /api/v2/dags/rareml_retrain/dagRuns` with `logical_date: null`, the
alert as the run's conf, and a run id derived from the alert group's key and start, so the same
alert delivered twice (Alertmanager repeats; several API replicas) is a 409 and starts nothing new.
Whatever goes wrong (Airflow down, slow, refusing the login) is an OrchestratorUnavailable: the
caller leaves the alert queued for the embedded watcher (06_retrain.py --watch). Standard library
only: the API image does not carry Airflow.
"""
from __future__ import annotations

import hashlib
import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from rareml.errors import RareMLError

RETRAIN_DAG = "rareml_retrain"
TIMEOUT_S = 3.0  # per call: Alertmanager waits for the webhook's answer


class OrchestratorUnavailable(Exception):
    """Airflow could not be asked (unreachable, timing out, refusing): the alert stays queued here."""


def run_id(group_key: str, starts_at: str) -> str:
    """The Airflow run id of an alert group's retraining: the same alert, the same id (a 409)."""
    digest = hashlib.sha256(f"{group_key}\n{starts_at}".encode()).hexdigest()[:24]
    return f"alert__{digest}"


@dataclass
class Airflow:
    """One Airflow API server; its token is fetched once and again when it expires."""

    url: str
    username: str
    password: str
    conf: dict = field(default_factory=dict)  # merged into every run's conf: the DAG's params (artifacts, db, ...)
    timeout: float = TIMEOUT_S
    dag_id: str = RETRAIN_DAG
    _token: str | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_env(cls, environ: dict, conf: dict | None = None) -> Airflow | None:
        """RAREML_AIRFLOW_URL, RAREML_AIRFLOW_USERNAME (default admin), RAREML_AIRFLOW_PASSWORD,
        RAREML_AIRFLOW_CONF (a JSON object of the DAG's params, e.g. {"config": ..., "budget": ...},
        over `conf`); None when no URL is set (the embedded watcher retrains)."""
        url = (environ.get("RAREML_AIRFLOW_URL") or "").rstrip("/")
        if not url:
            return None
        if not url.startswith(("http://", "https://")):
            raise RareMLError(f"RAREML_AIRFLOW_URL must be an http(s) address, got {url!r}")
        password = environ.get("RAREML_AIRFLOW_PASSWORD")
        if not password:
            raise RareMLError("RAREML_AIRFLOW_URL is set but RAREML_AIRFLOW_PASSWORD is not: the API cannot log in "
                              "to Airflow (make airflow prints the login)")
        try:
            more = json.loads(environ.get("RAREML_AIRFLOW_CONF") or "{}")
        except json.JSONDecodeError as exc:
            raise RareMLError(f"RAREML_AIRFLOW_CONF is not JSON: {exc}") from None
        if not isinstance(more, dict):
            raise RareMLError("RAREML_AIRFLOW_CONF must be a JSON object of the DAG's params")
        return cls(url, environ.get("RAREML_AIRFLOW_USERNAME") or "admin", password, (conf or {}) | more)

    def trigger(self, dag_run_id: str, conf: dict) -> str:
        """Start the retraining DAG as run `dag_run_id`: "created", or "exists" when a run of that
        id is already there (409). OrchestratorUnavailable otherwise."""
        body = {"dag_run_id": dag_run_id, "logical_date": None, "conf": self.conf | conf}
        for attempt in (1, 2):
            status, answer = self._call("POST", f"/api/v2/dags/{self.dag_id}/dagRuns", body, self.token())
            if status == 401 and attempt == 1:  # the token expired: one new login
                self._token = None
                continue
            if status in (200, 201):
                return "created"
            if status == 409:
                return "exists"
            raise OrchestratorUnavailable(f"Airflow answered {status} to the new {self.dag_id} run: {answer[:200]}")
        raise OrchestratorUnavailable("Airflow refused the new token")

    def run_state(self, dag_run_id: str) -> str:
        """The state of one run of the retraining DAG (queued, running, success, failed)."""
        return self.get(f"/api/v2/dags/{self.dag_id}/dagRuns/{dag_run_id}")["state"]

    def get(self, path: str) -> dict:
        """GET one path of the REST API (e.g. /api/v2/dags), its JSON answer; OrchestratorUnavailable
        unless it answers 200."""
        status, answer = self._call("GET", path, None, self.token())
        if status != 200:
            raise OrchestratorUnavailable(f"Airflow answered {status} to GET {path}: {answer[:200]}")
        return json.loads(answer)

    def token(self) -> str:
        with self._lock:
            if self._token is None:
                status, answer = self._call("POST", "/auth/token", {"username": self.username,
                                                                    "password": self.password}, None)
                if status not in (200, 201):
                    raise OrchestratorUnavailable(f"Airflow refused the login of {self.username!r} ({status})")
                self._token = json.loads(answer)["access_token"]
            return self._token

    def _call(self, method: str, path: str, body: dict | None, token: str | None) -> tuple[int, str]:
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except (OSError, ValueError) as exc:  # refused, reset, timed out, not HTTP
            raise OrchestratorUnavailable(f"Airflow at {self.url} cannot be reached: {exc}") from None
