"""The prediction log and the delayed labels, in SQLite: shared by all API workers, kept across
restarts, and the source of every windowed signal (drift, fairness, live performance).

One row per request, however many records it scored: its key, time, model version, and as arrays
the calibrated probabilities, the decisions and the encoded input rows (float32, what XGBoost sees;
UNSEEN marks a category never seen in training), the sensitive attributes that are not features,
and the request's body as the client sent it (`pack_request`; journaled as it came, compressed
by the writer thread on its way into the log, so no request waits for zlib), so an audit shows what
was sent and retraining learns levels the model never saw (`record_of`). So a 1,000-record batch
is one small write, not a thousand. A prediction's id is `<request key>-<position>`. A label, when it
arrives, is stored with a copy of its prediction, so the labeled window is one table read.
WAL mode lets several processes write; each thread of each process has its own connection.

Before a request is answered, its row is appended to its process's journal (rareml.journal, one
os.write), so no answered prediction is lost to a SIGKILL; a background thread of each process then
writes the queued rows into the log, at most FLUSH_SECONDS later, in transactions of at most
CHUNK_REQUESTS requests or CHUNK_BYTES (one commit per request cost a fifth of /predict's
throughput). The journal of a process that is gone is written into the log by whoever finds it:
the server's master at start (`replay`), every writer every REPLAY_SECONDS, a label for one of its
predictions. A label looks for its prediction in every journal, so it finds one answered a moment
ago by any process. A log file deleted under a running server is created anew, and the queued rows
go there. While the log cannot be written (full disk, read-only, locked), `status` says why, the
rows wait in memory (up to `max_pending_bytes`) and in the journal, and what cannot be kept is
refused with LogUnavailable: never answered and then dropped. With `retention`, requests and
alerts older than that are deleted (labels, which retraining needs, after `label_retention`).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import sqlite3
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rareml import journal

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
    extras TEXT,
    raw BLOB
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
CREATE TABLE IF NOT EXISTS retrains (
    seq INTEGER PRIMARY KEY,
    alert_key TEXT NOT NULL UNIQUE,
    alertname TEXT NOT NULL,
    queued REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    outcome TEXT,
    detail TEXT
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
    extras TEXT,
    raw TEXT
);
"""
_ADDED = {"requests": ("raw", "BLOB"), "feedback": ("raw", "TEXT")}  # columns newer than the log's first release
RAW_ONE, RAW_RECORDS, RAW_COLUMNS = b"1", b"R", b"C"  # what a request's body holds: first byte of its raw


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


@dataclass(frozen=True)
class LogStatus:
    """Whether this process can write the log now (what /ready reports), and its backlog."""

    writable: bool
    reason: str | None  # why not; names files relative to the log's folder
    pending_requests: int  # answered and journaled, not yet in the log
    pending_bytes: int
    replayed: int  # requests written from the journals of processes that were gone, by this process
    failures: int  # failed writes (and refused predictions) in this process so far


FLUSH_SECONDS = 0.05
FLUSH_REQUESTS = 256  # or sooner, when this many requests wait
CHUNK_REQUESTS, CHUNK_BYTES = 512, 1 << 20  # at most per transaction (halved after each failure)
MAX_PENDING_BYTES = 256 << 20  # queued while the log cannot be written; then predictions are refused
REPLAY_SECONDS = 5.0  # how often each writer looks for the journals of processes that are gone
PROBE_SECONDS = 1.0  # how often a failing log is tried when nothing waits (status recovers unaided)
PRUNE_SECONDS, PRUNE_BATCH = 300.0, 2000  # retention: rounds at most this often, rows per delete
MIN_FREE_BYTES = 1 << 20  # less free on the log's filesystem: not writable (every process sees it, not
# only the one whose write failed first; and the backlog keeps room to drain)
BUSY_SECONDS = 10.0  # how long a write waits for another process's; then LogUnavailable
WAIT_SECONDS = 1.0  # how long a reader waits for this process's writer before reading what is there
_INSERT = ("INSERT OR IGNORE INTO requests (key, ts, model_version, n, probability, decision, x, extras, raw) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")  # OR IGNORE: a row may be journaled, and so written, twice
_PREDICTION_ID = re.compile(r"([0-9a-f]{16})-(0|[1-9][0-9]{0,8})")
_STORES: weakref.WeakSet = weakref.WeakSet()  # reset in a forked child (see _after_fork)
_FORK_HOOK: list = []  # registered once, with the first store
_INHERITED: list = []  # a parent's connections, never closed in its child


class UnknownPrediction(LookupError):
    pass


class DuplicateFeedback(ValueError):
    pass


class LogUnavailable(RuntimeError):
    """The log cannot be written now; nothing was recorded. `reason` names no absolute path."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def wants_retrain(alert: dict) -> bool:
    """A firing alert labelled retrain="true" asks for one retraining."""
    return alert["status"] == "firing" and alert["labels"].get("retrain") == "true"


def alert_key(alert: dict) -> str:
    """What makes one alert one retraining: its fingerprint (else its name) and when it started."""
    return f"{alert.get('fingerprint') or alert['labels']['alertname']}@{alert.get('startsAt')}"


class Store:
    """One SQLite file; safe to use from several processes and threads."""

    def __init__(self, path: str | Path, n_features: int, *, max_pending_bytes: int = MAX_PENDING_BYTES,
                 retention: float | None = None, label_retention: float | None = None):
        self.path, self.n_features, self.max_pending_bytes = Path(path), n_features, max_pending_bytes
        self.retention, self.label_retention = retention, label_retention
        self._root = self.path.with_name(self.path.name + ".journal")
        self._exit_registered = False
        self._reset()
        if not _FORK_HOOK:
            os.register_at_fork(after_in_child=_after_fork)
            _FORK_HOOK.append(_after_fork)
        _STORES.add(self)

    def _reset(self) -> None:
        """This process's state, empty: at start, and in a forked child (the parent's backlog and
        journal stay the parent's)."""
        self._backlog = journal.Backlog(self._root, self.max_pending_bytes)
        self._local, self._conns = threading.local(), []
        self._write_lock = threading.Lock()  # one transaction of queued rows at a time
        self._start_lock, self._status_lock = threading.Lock(), threading.Lock()
        self._wake, self._closed = threading.Event(), threading.Event()
        self._writer: threading.Thread | None = None
        self._problems: dict[str, str] = {}  # what cannot be written now -> why
        self._replayed = self._failures = 0
        self._chunk_bytes = CHUNK_BYTES
        self._sent: tuple = ("", None, None)  # the last request body a label parsed: (key, kind, body)

    # -- connections --------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection to the file now at `path` (opened again if it was deleted or replaced)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and _inode(self.path) == self._local.inode:
            return conn
        if conn is not None:
            conn.close()
        self._local.conn, self._local.inode = self._open()
        with self._status_lock:
            self._conns.append(self._local.conn)
        return self._local.conn

    def _open(self) -> tuple[sqlite3.Connection, int]:
        self._root.mkdir(parents=True, exist_ok=True)
        with journal.locked(self._root / "create.lock"):  # one process creates a missing file
            if not self.path.exists():  # a stale -wal would be applied to the new file
                for suffix in ("-wal", "-shm"):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            for table, (column, kind) in _ADDED.items():  # a log written by an older release
                if column not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            return conn, _inode(self.path)

    def ping(self) -> None:
        """Raise (OSError, sqlite3.Error) unless the log can be opened and read; a file deleted or
        replaced is opened (created) again. Whether it can be written: `status`."""
        self._conn().execute("SELECT 1 FROM requests LIMIT 1").fetchall()

    # -- predictions --------------------------------------------------------------------------

    def add_predictions(self, version: str, probability: np.ndarray, decision: np.ndarray, rows: np.ndarray,
                        extras: list[dict] | None = None, raw: bytes | None = None) -> list[str]:
        """Log one request's predictions (and `raw`, its body from `pack_request`); returns their
        ids, in order, once they are journaled. LogUnavailable if they cannot be (the journal
        cannot be written, or the backlog is full)."""
        key = os.urandom(8).hex()
        row = (key, time.time(), version, len(rows), np.asarray(probability, np.float64).tobytes(),
               np.asarray(decision, np.uint8).tobytes(), np.asarray(rows, np.float32).tobytes(),
               json.dumps(extras) if extras and extras[0] else None, raw)
        try:
            waiting = self._backlog.add(row)
        except journal.BacklogFull as exc:
            with self._status_lock:
                why = "; ".join(v for k, v in self._problems.items() if k != "backlog") or "the writes are slow"
            raise self._unavailable("backlog", f"backlog full: {exc} for {self.path.name} ({why})") from None
        except OSError as exc:
            raise self._unavailable("journal", exc) from None
        if self._problems:
            self._recovered("journal")
        if self._writer is None:
            self._start_writer()
        if waiting >= FLUSH_REQUESTS:
            self._wake.set()
        return [f"{key}-{i}" for i in range(len(rows))]

    def flush(self) -> None:
        """Write this process's queued predictions into the log now; LogUnavailable if they cannot
        be (they stay queued and journaled)."""
        self._flush(-1)

    def _flush(self, wait: float) -> None:
        """Chunk after chunk until the queue is empty (or the write lock is not free within `wait`)."""
        while self._write_lock.acquire(timeout=wait):
            try:
                if not self._write_chunk():
                    return
            finally:
                self._write_lock.release()

    def _flush_quietly(self, wait: float = -1) -> None:
        try:
            self._flush(wait)
        except LogUnavailable:
            pass  # counted in status(); the rows wait

    def _write_chunk(self) -> bool:
        """One transaction of queued rows, the oldest first; False if none wait."""
        try:
            self._backlog.check()
        except OSError as exc:
            self._unavailable("journal", exc)
        chunk = self._backlog.take(CHUNK_REQUESTS, self._chunk_bytes)
        if not chunk:
            return False
        try:
            conn = self._conn()
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(_INSERT, [_compressed(row) for _, row, _ in chunk])
            moved = _inode(self.path) != self._local.inode  # deleted meanwhile: again, into the new file
        except (sqlite3.Error, OSError) as exc:
            self._backlog.give_back(chunk)
            self._chunk_bytes = max(self._chunk_bytes // 2, CHUNK_BYTES // 16)  # a full disk may take less
            raise self._unavailable("log", exc) from exc
        if moved:
            self._backlog.give_back(chunk)
            return True
        self._chunk_bytes = min(2 * self._chunk_bytes, CHUNK_BYTES)
        try:
            self._backlog.written(chunk)
        except OSError as exc:
            log.warning("cannot delete a written journal segment: %s", self._reason(exc))
        self._recovered("log", "backlog")
        return True

    # -- the writer thread --------------------------------------------------------------------

    def _start_writer(self) -> None:
        with self._start_lock:
            if self._writer is not None:
                return
            self._writer = threading.Thread(target=self._write_forever, name="rareml-log-writer", daemon=True)
            self._writer.start()
            if not self._exit_registered:
                atexit.register(self.close)
                self._exit_registered = True

    def _write_forever(self) -> None:
        due = {"replay": 0.0, "probe": 0.0, "prune": 0.0}
        while not self._closed.is_set():
            try:
                self._tick(due)
            except Exception:  # the writer must outlive any surprise
                log.exception("the prediction log's writer failed; it goes on")
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()

    def _tick(self, due: dict[str, float]) -> None:
        self._flush_quietly()
        now = time.monotonic()
        if now >= due["replay"]:
            self.replay()
            due["replay"] = now + REPLAY_SECONDS
        if self._problems and not len(self._backlog) and now >= due["probe"]:
            self._probe()
            due["probe"] = now + PROBE_SECONDS
        if (self.retention or self.label_retention) and now >= due["prune"]:
            self._prune(due_only=True)
            due["prune"] = now + PRUNE_SECONDS

    def _probe(self) -> None:
        """A small write to whatever failed, so that status recovers with no traffic (/ready says
        503, so none comes)."""
        if "journal" in self._problems:
            try:
                self._backlog.probe()
            except OSError as exc:
                self._unavailable("journal", exc)
            else:
                self._recovered("journal")
        if "log" in self._problems:
            try:
                with self._conn() as conn:
                    conn.execute("CREATE TABLE IF NOT EXISTS probe (pid INTEGER PRIMARY KEY, ts REAL NOT NULL)")
                    conn.execute("INSERT OR REPLACE INTO probe VALUES (?, ?)", (os.getpid(), time.time()))
            except (sqlite3.Error, OSError) as exc:
                self._unavailable("log", exc)
            else:
                self._recovered("log")

    def close(self) -> None:
        """Write what is queued, stop the writer, delete this process's journal (kept if anything
        could not be written: it is replayed later) and close the files. Called at exit; the store
        can be used again after."""
        self._closed.set()
        self._wake.set()
        if self._writer is not None and self._writer is not threading.current_thread():
            self._writer.join(timeout=60)
        self._flush_quietly()
        self._backlog.close()
        with self._status_lock:
            for conn in self._conns:
                conn.close()
            self._conns, self._local = [], threading.local()
        self._writer, self._closed = None, threading.Event()

    # -- replay -------------------------------------------------------------------------------

    def replay(self) -> int:
        """Write into the log the rows journaled by processes that are gone, then delete their
        journals; idempotent, safe anywhere at any time. Returns the requests added. A journal that
        cannot be written now is kept (status says why)."""
        added = 0
        for folder in journal.orphans(self._root):
            try:
                self._conn()
                added += sum(self._insert(rows) for rows in journal.segments(folder))
                if _inode(self.path) == self._local.inode:  # else written to a deleted file: next time
                    journal.delete(folder)
            except (sqlite3.Error, OSError) as exc:
                self._unavailable("log", exc)
            except ValueError as exc:
                log.warning("journal %s kept: %s", folder.name, exc)
        if added:
            log.info("%d requests written from the journals of processes that are gone", added)
        with self._status_lock:
            self._replayed += added
        return added

    def _insert(self, rows: list[tuple]) -> int:
        """Write journaled rows (those not in the log yet), in bounded transactions; returns how many."""
        conn, added = self._conn(), 0
        for i in range(0, len(rows), CHUNK_REQUESTS):
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                before = conn.total_changes
                conn.executemany(_INSERT, [_compressed(row) for row in rows[i:i + CHUNK_REQUESTS]])
                added += conn.total_changes - before
        return added

    # -- labels -------------------------------------------------------------------------------

    def add_feedback(self, prediction_id: str, label: int) -> None:
        """Record a label with a copy of its prediction: UnknownPrediction, DuplicateFeedback, or
        LogUnavailable if the log cannot be read or written now."""
        if label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {label!r}")
        match = _PREDICTION_ID.fullmatch(prediction_id)
        if match is None:  # one spelling per prediction: no '-01' alias of '-1'
            raise UnknownPrediction(prediction_id)
        key, i = match[1], int(match[2])
        try:
            got = self._request_slice(key, i) or self._unwritten_slice(key, i)
            if got is None and self._conn().execute("SELECT 1 FROM feedback WHERE prediction_id = ?",
                                                    (prediction_id,)).fetchone():
                raise DuplicateFeedback(prediction_id)  # its prediction is gone (retention), its label is not
            if got is None or i >= got[1]:
                raise UnknownPrediction(prediction_id)
            version, _, p, d, x, extras, raw = got
            extra = json.dumps(json.loads(extras)[i]) if extras else None
            sent = self._record_sent(key, raw, i)
            self._conn().execute(
                "INSERT INTO feedback (prediction_id, label, ts, model_version, probability, decision, x, extras, raw) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (prediction_id, label, time.time(), version, struct.unpack("<d", p)[0], d[0], x, extra,
                 json.dumps(sent) if sent is not None else None))
        except sqlite3.IntegrityError:
            raise DuplicateFeedback(prediction_id) from None
        except (sqlite3.Error, OSError) as exc:
            raise self._unavailable("log", exc) from exc

    def _record_sent(self, key: str, raw: bytes | None, i: int) -> dict | None:
        """`record_of` for request `key`, its body parsed once for all its labels (those of a
        1,000-record batch come together: one parse, not a thousand)."""
        if self._sent[0] != key:
            self._sent = (key, *_unpack(raw)) if raw else (key, None, None)
        _, kind, sent = self._sent
        return _record(kind, sent, i) if kind else None

    def _unwritten_slice(self, key: str, i: int) -> tuple | None:
        """A prediction answered but not in the log yet: in a journal (of this process, of a live
        one, of one that is gone). Written into the log, then read back."""
        self.replay()
        row = journal.find(self._root, key)
        if row is not None:
            self._insert([row])
        return self._request_slice(key, i)  # also if its writer wrote it while we looked

    def _request_slice(self, key: str, i: int) -> tuple | None:
        width = 4 * self.n_features
        return self._conn().execute(
            "SELECT model_version, n, substr(probability, ? * 8 + 1, 8), substr(decision, ? + 1, 1), "
            "substr(x, ? * ? + 1, ?), extras, raw FROM requests WHERE key = ?", (i, i, i, width, width, key)).fetchone()

    # -- reading ------------------------------------------------------------------------------

    def window(self, version: str, size: int) -> Window:
        """The last `size` predictions of this model version (whole requests, the oldest trimmed);
        this process's queued ones included if they can be written, else what the log holds."""
        if not self._problems:  # else the writer keeps trying; a reader does not wait for it
            self._flush_quietly(WAIT_SECONDS)
        probability, decision, rows, extras, n = [], [], [], [], 0
        try:
            cursor = self._conn().execute("SELECT n, probability, decision, x, extras FROM requests "
                                          "WHERE model_version = ? ORDER BY seq DESC", (version,))
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
        except (sqlite3.Error, OSError) as exc:
            raise self._unavailable("log", exc) from exc
        return Window(*self._stack(probability, decision, rows), extras)

    def labeled(self, version: str, size: int) -> Labeled:
        got = self._read("SELECT probability, decision, x, extras, label FROM feedback WHERE model_version = ? "
                         "ORDER BY seq DESC LIMIT ?", (version, size))
        rows = np.frombuffer(b"".join(r[2] for r in got), np.float32).reshape(len(got), self.n_features)
        return Labeled(np.array([r[0] for r in got], float), np.array([r[1] for r in got], int),
                       rows.astype(np.float64), [json.loads(r[3]) if r[3] else {} for r in got],
                       label=np.array([r[4] for r in got], int))

    def labelled_records(self, since: float | None = None) -> list[dict]:
        """Every label of a prediction made at or after `since` (epoch seconds; all if None),
        oldest prediction first: its id, time (of the prediction, else of the label), label, model
        version, probability, and the record as the client sent it (None if the log has none: a
        log written by an older release)."""
        got = self._read(
            "SELECT f.prediction_id, coalesce(r.ts, f.ts), f.label, f.model_version, f.probability, f.raw "
            "FROM feedback f LEFT JOIN requests r ON r.key = substr(f.prediction_id, 1, 16) "
            "WHERE coalesce(r.ts, f.ts) >= ? ORDER BY coalesce(r.ts, f.ts), f.seq", (since or 0.0,))
        return [{"prediction_id": r[0], "ts": r[1], "label": r[2], "model_version": r[3], "probability": r[4],
                 "record": json.loads(r[5]) if r[5] else None} for r in got]

    def add_alerts(self, alerts: list[dict]) -> int:
        """Record alerts as Alertmanager's webhook sends them (already validated), and in the same
        transaction queue one retraining per firing alert labelled retrain="true", once per alert
        (its fingerprint and start: Alertmanager repeats a notification). Returns how many
        retrainings are new; LogUnavailable if the log cannot be written now."""
        now = time.time()
        wanted = [a for a in alerts if wants_retrain(a)]
        with self._transaction() as conn:
            conn.executemany(
                "INSERT INTO alerts (received, status, alertname, fingerprint, starts_at, labels, annotations) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(now, a["status"], a["labels"]["alertname"], a.get("fingerprint"), a.get("startsAt"),
                  json.dumps(a["labels"]), json.dumps(a.get("annotations", {}))) for a in alerts])
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO retrains (alert_key, alertname, queued) VALUES (?, ?, ?)",
                             [(alert_key(a), a["labels"]["alertname"], now) for a in wanted])
            return conn.total_changes - before

    def hand_off(self, keys: list[str], detail: dict) -> list[str]:
        """Claim for an orchestrator the queued retrainings of these alert keys that no watcher has
        claimed (outcome 'airflow', `detail` naming the run): returns their keys. The orchestrator
        records the final outcome later (finish_retrain by key); release() queues them again."""
        with self._transaction() as conn:
            mine = [r[0] for r in conn.execute(
                f"SELECT alert_key FROM retrains WHERE started IS NULL AND finished IS NULL AND alert_key IN "
                f"({', '.join('?' * len(keys))}) ORDER BY seq", keys)]
            now = time.time()
            conn.executemany("UPDATE retrains SET started = ?, finished = ?, attempts = attempts + 1, "
                             "outcome = 'airflow', detail = ? WHERE alert_key = ?",
                             [(now, now, json.dumps(detail), k) for k in mine])
            return mine

    def release(self, keys: list[str]) -> None:
        """Queue again for the watcher what hand_off marked, when the orchestrator could not take it."""
        with self._transaction() as conn:
            conn.executemany("UPDATE retrains SET started = NULL, finished = NULL, outcome = NULL, detail = NULL, "
                             "attempts = attempts - 1 WHERE alert_key = ? AND outcome = 'airflow'", [(k,) for k in keys])

    # -- the retraining queue (06_retrain.py --watch) --------------------------------------------

    def claim_retrain(self, max_attempts: int = 2) -> list[dict]:
        """Every queued retraining ({id, alertname, alert}), claimed at once (several alerts, one
        retraining); those begun and never finished (the watcher stopped mid-way) are queued
        again, up to `max_attempts`."""
        now = time.time()
        with self._transaction() as conn:
            conn.execute("UPDATE retrains SET finished = ?, outcome = 'failed', detail = ? WHERE started IS NOT "
                         "NULL AND finished IS NULL AND attempts >= ?",
                         (now, json.dumps({"reason": "interrupted, and tried too often"}), max_attempts))
            conn.execute("UPDATE retrains SET started = NULL WHERE started IS NOT NULL AND finished IS NULL")
            claimed = [{"id": r[0], "alertname": r[1], "alert": r[2]} for r in conn.execute(
                "SELECT seq, alertname, alert_key FROM retrains WHERE finished IS NULL ORDER BY seq")]
            conn.executemany("UPDATE retrains SET started = ?, attempts = attempts + 1 WHERE seq = ?",
                             [(now, c["id"]) for c in claimed])
            return claimed

    def finish_retrain(self, ids: list[int] | list[str], outcome: str, detail: dict) -> None:
        """Record how the retraining of these queued alerts ended (ids, or alert keys: strings)."""
        column = "alert_key" if ids and isinstance(ids[0], str) else "seq"
        with self._transaction() as conn:
            conn.executemany(f"UPDATE retrains SET finished = ?, outcome = ?, detail = ? WHERE {column} = ?",
                             [(time.time(), outcome, json.dumps(detail, default=str), i) for i in ids])

    def retrains(self, limit: int = 100) -> list[dict]:
        """The latest retrainings asked for, newest first, with their outcome once finished."""
        got = self._read("SELECT seq, alertname, alert_key, queued, started, finished, attempts, outcome, detail "
                         "FROM retrains ORDER BY seq DESC LIMIT ?", (limit,))
        names = ("id", "alertname", "alert", "queued", "started", "finished", "attempts", "outcome", "detail")
        return [dict(zip(names, r[:8]), detail=json.loads(r[8]) if r[8] else None) for r in got]

    def retrain_outcomes(self) -> dict[str, int]:
        """How many retrainings ended each way ('queued' and 'running' for those that have not)."""
        got = self._read("SELECT coalesce(outcome, CASE WHEN started IS NULL THEN 'queued' ELSE 'running' END), "
                         "count(*) FROM retrains GROUP BY 1", ())
        return dict(got)

    def last_retrain_finished(self) -> float | None:
        got = self._read("SELECT max(finished) FROM retrains WHERE outcome != 'not_enough_labels'", ())
        return got[0][0]

    def alerts(self, limit: int = 100) -> list[dict]:
        got = self._read("SELECT received, status, alertname, fingerprint, starts_at, labels, annotations FROM "
                         "alerts ORDER BY seq DESC LIMIT ?", (limit,))
        return [{"received": r[0], "status": r[1], "alertname": r[2], "fingerprint": r[3], "startsAt": r[4],
                 "labels": json.loads(r[5]), "annotations": json.loads(r[6])} for r in got]

    def counts(self) -> dict[str, int]:
        if not self._problems:
            self._flush_quietly(WAIT_SECONDS)
        got = self._read("SELECT (SELECT count(*) FROM requests), (SELECT coalesce(sum(n), 0) FROM requests), "
                         "(SELECT count(*) FROM feedback)", ())
        return dict(zip(("requests", "predictions", "feedback"), got[0]))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection in one write transaction (committed on leaving, rolled back on
        an exception); LogUnavailable if the log cannot be written."""
        try:
            with self._conn() as conn:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
        except (sqlite3.Error, OSError) as exc:
            raise self._unavailable("log", exc) from exc

    def _read(self, sql: str, parameters: tuple) -> list[tuple]:
        try:
            return self._conn().execute(sql, parameters).fetchall()
        except (sqlite3.Error, OSError) as exc:
            raise self._unavailable("log", exc) from exc

    def _stack(self, probability: list, decision: list, rows: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not probability:
            return np.empty(0), np.empty(0, int), np.empty((0, self.n_features))
        return (np.concatenate(probability), np.concatenate(decision).astype(int),
                np.concatenate(rows).astype(np.float64))

    # -- retention ----------------------------------------------------------------------------

    def prune(self) -> int:
        """Delete what is older than the retention now (the writer does it every PRUNE_SECONDS;
        this waits for another process's round to end); returns the rows deleted."""
        return self._prune(due_only=False)

    def _prune(self, due_only: bool) -> int:
        """Requests and alerts older than `retention`, labels older than `label_retention`, in
        transactions of PRUNE_BATCH rows; one process at a time, this process's queue written
        between them. The lock file holds the time of the last round."""
        self._root.mkdir(parents=True, exist_ok=True)
        fd = journal.try_lock(self._root / "prune.lock", create=True, wait=not due_only)
        if fd is None:
            return 0
        try:
            last = os.pread(fd, 8, 0)
            if due_only and len(last) == 8 and time.time() - struct.unpack("<d", last)[0] < PRUNE_SECONDS:
                return 0
            deleted = sum(self._prune_table(table, column, horizon) for table, column, horizon in (
                ("requests", "ts", self.retention), ("alerts", "received", self.retention),
                ("feedback", "ts", self.label_retention)) if horizon is not None)
            os.pwrite(fd, struct.pack("<d", time.time()), 0)
            return deleted
        except (sqlite3.Error, OSError) as exc:
            log.warning("cannot delete old rows from the prediction log: %s", self._reason(exc))
            return 0
        finally:
            os.close(fd)

    def _prune_table(self, table: str, column: str, horizon: float) -> int:
        """Rows are about in time order: delete those before the first one within the horizon
        (reading only what goes; one that arrived late goes once those before it have gone)."""
        conn, deleted = self._conn(), 0
        first = conn.execute(f"SELECT seq FROM {table} WHERE {column} >= ? ORDER BY seq LIMIT 1",
                             (time.time() - horizon,)).fetchone()
        end = first[0] if first else (conn.execute(f"SELECT max(seq) FROM {table}").fetchone()[0] or 0) + 1
        while True:
            gone = conn.execute(f"DELETE FROM {table} WHERE seq IN (SELECT seq FROM {table} WHERE seq < ? "
                                "ORDER BY seq LIMIT ?)", (end, PRUNE_BATCH)).rowcount
            deleted += gone
            if gone < PRUNE_BATCH:
                return deleted
            self._flush_quietly(0)

    # -- status -------------------------------------------------------------------------------

    def status(self) -> LogStatus:
        """Whether the log can be written now and why not (for /ready), and the backlog."""
        with self._status_lock:
            problems, replayed, failures = dict(self._problems), self._replayed, self._failures
        folder = self.path.parent  # a missing folder is made again at the next write; a file there is not
        if folder.exists() and not folder.is_dir():  # seen now, not at the next write (none may be waiting)
            problems.setdefault("log", f"the prediction log's folder {folder.name} is not a folder")
        free = _free_bytes(self.path.parent)
        if free is not None and free < MIN_FREE_BYTES:
            problems.setdefault("disk", f"the log's disk is full ({free // 1024} KiB free)")
        return LogStatus(not problems, "; ".join(problems.values()) or None, self._backlog.requests,
                         self._backlog.bytes, replayed, failures)

    def _unavailable(self, where: str, problem: Exception | str) -> LogUnavailable:
        """Note a failed write (logged when it starts or changes) and make the exception to raise."""
        names = {"log": self.path.name, "journal": self._root.name}
        reason = problem if isinstance(problem, str) else f"{names[where]}: {self._reason(problem)}"
        with self._status_lock:
            self._failures += 1
            new = self._problems.get(where) != reason
            self._problems[where] = reason
        if new:
            log.error("cannot write the prediction log (%d requests wait): %s", self._backlog.requests, reason)
        if self._writer is None and not self._closed.is_set():  # a first write that failed: the writer's
            self._start_writer()  # probes are what clear the problem (/ready) once it is gone
        return LogUnavailable(reason)

    def _recovered(self, *where: str) -> None:
        with self._status_lock:
            gone = [self._problems.pop(w) for w in where if w in self._problems]
        if gone:
            log.info("the prediction log can be written again (was: %s)", "; ".join(gone))

    def _reason(self, exc: Exception) -> str:
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        return text.replace(f"{self.path.parent.resolve()}{os.sep}", "").replace(f"{self.path.parent}{os.sep}", "")


def _free_bytes(folder: Path) -> int | None:
    """Bytes this process can still write on `folder`'s filesystem (root may use the reserved ones);
    None if it cannot be told."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return -1


def _after_fork() -> None:
    """In a forked child: each store starts empty (the queue and journal stay the parent's; its
    connections are kept unused, as SQLite asks)."""
    for store in list(_STORES):
        _INHERITED.append(store._local)
        store._backlog.abandon()
        store._reset()


def pack_request(kind: bytes, body: bytes) -> bytes:
    """A request's body as the journal keeps it: RAW_ONE (one record), RAW_RECORDS or RAW_COLUMNS
    (a batch), then the body."""
    return kind + body


def _compressed(row: tuple) -> tuple:
    """A journaled row as the log keeps it: its body compressed (zlib level 1: 8 us for a 700-byte
    record, some ms for a 1,000-record batch; the writer thread's time, not the request's)."""
    raw = row[-1]
    return row if not raw else (*row[:-1], raw[:1] + zlib.compress(memoryview(raw)[1:], 1))  # no copy of the body


def record_of(raw: bytes | None, i: int) -> dict | None:
    """Record `i` of a request as the client sent it (None if the log has no body for it)."""
    return _record(*_unpack(raw), i) if raw else None


def _unpack(raw: bytes) -> tuple[bytes, object]:
    """A logged body: (its kind, its JSON parsed)."""
    return raw[:1], json.loads(zlib.decompress(memoryview(raw)[1:]))


def _record(kind: bytes, sent: object, i: int) -> dict:
    if kind == RAW_ONE:
        return sent
    if kind == RAW_RECORDS:
        return sent["records"][i]
    return {name: values[i] if isinstance(values, list) and i < len(values) else None
            for name, values in sent["columns"].items()}
