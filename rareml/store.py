"""The prediction log and the delayed labels, in SQLite: shared by all API workers, kept across
restarts, and the source of every windowed signal (drift, fairness, live performance).

Each prediction is one row: its id, time, model version, calibrated probability, decision, the
encoded input row (float64 bytes, UNSEEN for a category never seen in training; the record can be
rebuilt from it for audits and retraining) and, as JSON, the sensitive attributes that are not
features. A label arrives later
through `add_feedback`. WAL mode lets several processes write; each process opens its own connection.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    ts REAL NOT NULL,
    model_version TEXT NOT NULL,
    probability REAL NOT NULL,
    decision INTEGER NOT NULL,
    x BLOB NOT NULL,
    extras TEXT
);
CREATE INDEX IF NOT EXISTS predictions_version ON predictions (model_version, seq);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prediction_id TEXT NOT NULL UNIQUE REFERENCES predictions (id),
    label INTEGER NOT NULL CHECK (label IN (0, 1)),
    ts REAL NOT NULL
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
class Labeled:
    """The most recent predictions that received a label, newest label first."""

    probability: np.ndarray
    decision: np.ndarray
    label: np.ndarray
    rows: np.ndarray
    extras: list[dict]


class UnknownPrediction(LookupError):
    pass


class DuplicateFeedback(ValueError):
    pass


class Store:
    """One SQLite file; safe to use from several processes (one connection each, opened lazily)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._pid = -1

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # never share a connection across fork
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def ping(self) -> None:
        self.conn.execute("SELECT 1 FROM predictions LIMIT 1").fetchall()

    def add_predictions(self, ids: list[str], version: str, probability: np.ndarray, decision: np.ndarray,
                        rows: np.ndarray, extras: list[dict] | None = None) -> None:
        now = time.time()
        texts = [json.dumps(e) for e in extras] if extras and extras[0] else [None] * len(ids)
        rows = np.ascontiguousarray(rows, dtype=np.float64)
        values = list(zip(ids, [now] * len(ids), [version] * len(ids), probability.tolist(), decision.tolist(),
                          [r.tobytes() for r in rows], texts))
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO predictions (id, ts, model_version, probability, decision, x, extras) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", values)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def add_feedback(self, prediction_id: str, label: int) -> None:
        try:
            self.conn.execute("INSERT INTO feedback (prediction_id, label, ts) SELECT id, ?, ? FROM predictions "
                              "WHERE id = ?", (label, time.time(), prediction_id))
        except sqlite3.IntegrityError:
            raise DuplicateFeedback(prediction_id) from None
        if self.conn.execute("SELECT changes()").fetchone()[0] == 0:
            raise UnknownPrediction(prediction_id)

    def window(self, version: str, size: int, n_features: int) -> Window:
        got = self.conn.execute("SELECT probability, decision, x, extras FROM predictions WHERE model_version = ? "
                                "ORDER BY seq DESC LIMIT ?", (version, size)).fetchall()
        return Window(*_columns(got, n_features))

    def labeled(self, version: str, size: int, n_features: int) -> Labeled:
        got = self.conn.execute("SELECT p.probability, p.decision, p.x, p.extras, f.label FROM feedback f JOIN "
                                "predictions p ON p.id = f.prediction_id WHERE p.model_version = ? ORDER BY f.seq DESC "
                                "LIMIT ?", (version, size)).fetchall()
        probability, decision, rows, extras = _columns(got, n_features)
        return Labeled(probability, decision, np.array([r[4] for r in got], dtype=int), rows, extras)

    def counts(self) -> dict[str, int]:
        one = self.conn.execute
        return {"predictions": one("SELECT count(*) FROM predictions").fetchone()[0],
                "feedback": one("SELECT count(*) FROM feedback").fetchone()[0]}


def _columns(got: list[tuple], n_features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    rows = np.frombuffer(b"".join(r[2] for r in got), dtype=np.float64).reshape(len(got), n_features)
    return (np.array([r[0] for r in got], dtype=float), np.array([r[1] for r in got], dtype=int), rows,
            [json.loads(r[3]) if r[3] else {} for r in got])
