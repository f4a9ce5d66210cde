"""The prediction log and the delayed labels, in SQLite: shared by all API workers, kept across
restarts, and the source of every windowed signal (drift, fairness, live performance).

One row per request, however many records it scored: its key, time, model version, and as arrays
the calibrated probabilities, the decisions and the encoded input rows (float32, what XGBoost sees;
UNSEEN marks a category never seen in training; the records can be rebuilt from them for audits
and retraining), plus the sensitive attributes that are not features. So a 1,000-record batch is
one small write, not a thousand. A prediction's id is `<request key>-<position>`. A label, when it
arrives, is stored with a copy of its prediction, so the labeled window is one table read.
WAL mode lets several processes write; each process opens its own connection.

Predictions are written by a background thread of each process, at most FLUSH_SECONDS after the
request (one transaction for all requests of that interval, instead of one commit per request,
which cost a fifth of /predict's throughput with two workers competing for the write lock). A
label for a prediction not yet visible waits for the writers (at most 2 x FLUSH_SECONDS). A
process killed with SIGKILL loses what it had not yet written; a normal exit writes it.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    ts REAL NOT NULL,
    model_version TEXT NOT NULL,
    n INTEGER NOT NULL,
    probability BLOB NOT NULL,
    decision BLOB NOT NULL,
    x BLOB NOT NULL,
    extras TEXT
);
CREATE TABLE IF NOT EXISTS alerts (
    seq INTEGER PRIMARY KEY,
    received REAL NOT NULL,
    status TEXT NOT NULL,
    alertname TEXT NOT NULL,
    fingerprint TEXT,
    starts_at TEXT,
    labels TEXT NOT NULL,
    annotations TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY,
    prediction_id TEXT NOT NULL UNIQUE,
    label INTEGER NOT NULL CHECK (label IN (0, 1)),
    ts REAL NOT NULL,
    model_version TEXT NOT NULL,
    probability REAL NOT NULL,
    decision INTEGER NOT NULL,
    x BLOB NOT NULL,
    extras TEXT
);
"""


@dataclass(frozen=True)
class Window:
    """The most recent predictions of one model version, newest first."""

    probability: np.ndarray
    decision: np.ndarray
    rows: np.ndarray  # [predictions, features], encoded
    extras: list[dict]


@dataclass(frozen=True)
class Labeled(Window):
    """The most recent predictions that received a label, newest label first."""

    label: np.ndarray = None


FLUSH_SECONDS = 0.05
FLUSH_REQUESTS = 256  # or sooner, when this many requests wait
MAX_PENDING = 100_000  # requests kept in memory while the log cannot be written (/ready says so)
_INSERT = ("INSERT INTO requests (key, ts, model_version, n, probability, decision, x, extras) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_PREDICTION_ID = re.compile(r"([0-9a-f]{16})-(0|[1-9][0-9]{0,8})")


class UnknownPrediction(LookupError):
    pass


class DuplicateFeedback(ValueError):
    pass


class Store:
    """One SQLite file; safe to use from several processes (one connection each, opened lazily)."""

    def __init__(self, path: str | Path, n_features: int):
        self.path, self.n_features = Path(path), n_features
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._pending: list[tuple] = []
        self._lock = threading.Lock()  # guards _pending; held for a moment only, never across a write
        self._write_lock = threading.Lock()  # flushes one at a time
        self._wake = threading.Event()
        self._writer_pid = -1
        self._writer_conn: sqlite3.Connection | None = None  # used under _write_lock only
        self._failures = 0

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # never share a connection across fork
            self._conn, self._pid, self._inode = self._connect(), os.getpid(), self.path.stat().st_ino
        return self._conn

    def ping(self) -> None:
        """Raise unless the log is readable and still the file this process writes to (a file
        deleted or replaced under a running server would swallow predictions)."""
        self.conn.execute("SELECT 1 FROM requests LIMIT 1").fetchall()
        try:
            same = self.path.stat().st_ino == self._inode
        except OSError:
            same = False
        if not same:
            raise OSError(f"{self.path} was deleted or replaced while in use: restart the server")

    def add_predictions(self, version: str, probability: np.ndarray, decision: np.ndarray, rows: np.ndarray,
                        extras: list[dict] | None = None) -> list[str]:
        """Log one request's predictions; returns their ids, in order."""
        key = os.urandom(8).hex()
        row = (key, time.time(), version, len(rows), np.asarray(probability, np.float64).tobytes(),
               np.asarray(decision, np.uint8).tobytes(), np.asarray(rows, np.float32).tobytes(),
               json.dumps(extras) if extras and extras[0] else None)
        self.conn  # noqa: B018 (opens and checks the log in this process before answering)
        with self._lock:
            self._pending.append(row)
            waiting = len(self._pending)
        if self._writer_pid != os.getpid():
            self._start_writer()
        if waiting >= FLUSH_REQUESTS:
            self._wake.set()
        return [f"{key}-{i}" for i in range(len(rows))]

    def flush(self) -> None:
        """Write the predictions waiting in this process, in one transaction. The requests go on
        adding to the queue while it is written."""
        with self._write_lock:
            with self._lock:
                pending, self._pending = self._pending, []
            if not pending:
                return
            try:
                if self._writer_conn is None or self._writer_pid != os.getpid():
                    self._writer_conn = self._connect()
                with self._writer_conn as conn:  # one transaction: all or nothing
                    conn.execute("BEGIN IMMEDIATE")
                    conn.executemany(_INSERT, pending)
            except BaseException:
                with self._lock:
                    self._pending = (pending + self._pending)[-MAX_PENDING:]  # kept for the next try
                raise

    def _start_writer(self) -> None:
        self._writer_pid, self._writer_conn = os.getpid(), None
        self._wake = threading.Event()
        threading.Thread(target=self._write_forever, name="rareml-log-writer", daemon=True).start()
        atexit.register(self._flush_logged)

    def _write_forever(self) -> None:
        while True:
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            self._flush_logged()

    def _flush_logged(self) -> None:
        try:
            self.flush()
        except (sqlite3.Error, OSError) as exc:
            self._failures += 1
            if self._failures % 200 == 1:  # once, then every ~10 s while it lasts
                log.error("cannot write to the prediction log %s (%d requests wait): %s", self.path,
                          len(self._pending), exc)
        else:
            self._failures = 0

    def add_feedback(self, prediction_id: str, label: int) -> None:
        if label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {label!r}")
        match = _PREDICTION_ID.fullmatch(prediction_id)
        if match is None:  # one spelling per prediction: no '-01' alias of '-1'
            raise UnknownPrediction(prediction_id)
        key, i, width = match[1], int(match[2]), 4 * self.n_features
        got = self._request_slice(key, i, width)
        if got is None:  # not written yet? this process's, then the other writers' next flush
            self.flush()
            got = self._request_slice(key, i, width)
        if got is None:
            time.sleep(2 * FLUSH_SECONDS)
            got = self._request_slice(key, i, width)
        if got is None or i >= got[1]:
            raise UnknownPrediction(prediction_id)
        version, _, p, d, x, extras = got
        extra = json.dumps(json.loads(extras)[i]) if extras else None
        try:
            self.conn.execute("INSERT INTO feedback (prediction_id, label, ts, model_version, probability, decision, x, "
                              "extras) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (prediction_id, label, time.time(), version,
                                                                          float(np.frombuffer(p)[0]), d[0], x, extra))
        except sqlite3.IntegrityError:
            raise DuplicateFeedback(prediction_id) from None

    def _request_slice(self, key: str, i: int, width: int) -> tuple | None:
        return self.conn.execute(
            "SELECT model_version, n, substr(probability, ? * 8 + 1, 8), substr(decision, ? + 1, 1), "
            "substr(x, ? * ? + 1, ?), extras FROM requests WHERE key = ?", (i, i, i, width, width, key)).fetchone()

    def window(self, version: str, size: int) -> Window:
        """The last `size` predictions of this model version (whole requests, the oldest trimmed)."""
        self.flush()  # this process's own predictions included
        probability, decision, rows, extras, n = [], [], [], [], 0
        cursor = self.conn.execute("SELECT n, probability, decision, x, extras FROM requests WHERE model_version = ? "
                                   "ORDER BY seq DESC", (version,))
        for count, p, d, x, e in cursor:
            take = min(count, size - n)
            probability.append(np.frombuffer(p, np.float64)[::-1][:take])
            decision.append(np.frombuffer(d, np.uint8)[::-1][:take])
            rows.append(np.frombuffer(x, np.float32).reshape(count, self.n_features)[::-1][:take])
            extras.extend((json.loads(e)[::-1] if e else [{}] * count)[:take])
            n += take
            if n >= size:
                break
        cursor.close()
        return Window(*self._stack(probability, decision, rows), extras)

    def labeled(self, version: str, size: int) -> Labeled:
        got = self.conn.execute("SELECT probability, decision, x, extras, label FROM feedback WHERE model_version = ? "
                                "ORDER BY seq DESC LIMIT ?", (version, size)).fetchall()
        rows = np.frombuffer(b"".join(r[2] for r in got), np.float32).reshape(len(got), self.n_features)
        return Labeled(np.array([r[0] for r in got], float), np.array([r[1] for r in got], int),
                       rows.astype(np.float64), [json.loads(r[3]) if r[3] else {} for r in got],
                       label=np.array([r[4] for r in got], int))

    def add_alerts(self, alerts: list[dict]) -> None:
        """Record alerts as Alertmanager's webhook sends them (already validated)."""
        now = time.time()
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                "INSERT INTO alerts (received, status, alertname, fingerprint, starts_at, labels, annotations) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(now, a["status"], a["labels"]["alertname"], a.get("fingerprint"), a.get("startsAt"),
                  json.dumps(a["labels"]), json.dumps(a.get("annotations", {}))) for a in alerts])

    def alerts(self, limit: int = 100) -> list[dict]:
        got = self.conn.execute("SELECT received, status, alertname, fingerprint, starts_at, labels, annotations FROM "
                                "alerts ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [{"received": r[0], "status": r[1], "alertname": r[2], "fingerprint": r[3], "startsAt": r[4],
                 "labels": json.loads(r[5]), "annotations": json.loads(r[6])} for r in got]

    def counts(self) -> dict[str, int]:
        self.flush()
        one = self.conn.execute
        return {"requests": one("SELECT count(*) FROM requests").fetchone()[0],
                "predictions": one("SELECT coalesce(sum(n), 0) FROM requests").fetchone()[0],
                "feedback": one("SELECT count(*) FROM feedback").fetchone()[0]}

    def _stack(self, probability: list, decision: list, rows: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not probability:
            return np.empty(0), np.empty(0, int), np.empty((0, self.n_features))
        return (np.concatenate(probability), np.concatenate(decision).astype(int),
                np.concatenate(rows).astype(np.float64))
