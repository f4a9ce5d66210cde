"""Retention: the prediction log deletes requests and alerts older than its retention (labels after
their own, longer one), one process at a time, and keeps everything recent."""
from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest

import rareml.store as store_module
from rareml import journal
from rareml.store import DuplicateFeedback, Store, UnknownPrediction
from tests.unit.test_store import N_FEATURES, log

DAY = 86_400.0


def age(path, table: str, column: str, seconds: float, where: str = "1") -> None:
    """Make rows older, as if written `seconds` ago."""
    with sqlite3.connect(path) as conn:
        conn.execute(f"UPDATE {table} SET {column} = {column} - ? WHERE {where}", (seconds,))


def filled(path, **retention) -> tuple[Store, list[str], list[str]]:
    """A log with 30 old requests (2 of them labeled), 20 recent ones (1 labeled), old and new
    alerts; and a store with that retention which has not written (so its writer has not pruned)."""
    store = Store(path, N_FEATURES)
    old = [log(store, 1, start=i)[0][0] for i in range(30)]
    store.add_feedback(old[0], 1)
    store.add_feedback(old[1], 0)
    store.add_alerts([{"status": "firing", "labels": {"alertname": "old"}}])
    store.flush()
    age(path, "requests", "ts", 10 * DAY)
    age(path, "feedback", "ts", 10 * DAY)
    age(path, "alerts", "received", 10 * DAY)
    new = [log(store, 1, start=100 + i)[0][0] for i in range(20)]
    store.add_feedback(new[0], 1)
    store.add_alerts([{"status": "resolved", "labels": {"alertname": "new"}}])
    store.flush()
    return Store(path, N_FEATURES, **retention), old, new


def test_retention_deletes_old_requests_and_alerts_and_keeps_labels(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "PRUNE_BATCH", 7)  # several small deletes
    store, old, new = filled(tmp_path / "p.db", retention=7 * DAY)
    assert store.prune() == 31
    assert store.counts() == {"requests": 20, "predictions": 20, "feedback": 3}
    assert [a["labels"]["alertname"] for a in store.alerts()] == ["new"]
    assert store.labeled("v1", 10).label.tolist() == [1, 0, 1]  # labels keep their copy of the prediction
    with pytest.raises(UnknownPrediction):
        store.add_feedback(old[2], 1)
    for pid in new[1:]:
        store.add_feedback(pid, 0)
    with pytest.raises(DuplicateFeedback):
        store.add_feedback(old[0], 0)
    assert store.prune() == 0


def test_labels_have_their_own_retention(tmp_path):
    store, _, _ = filled(tmp_path / "p.db", retention=30 * DAY, label_retention=7 * DAY)
    assert store.prune() == 2
    assert store.counts() == {"requests": 50, "predictions": 50, "feedback": 1}


def test_a_late_row_goes_once_those_before_it_have_gone(tmp_path):
    """Rows are deleted from the oldest up to the first recent one: an old row written late (from a
    replayed journal) waits behind recent ones, and is never read before its turn."""
    path = tmp_path / "p.db"
    store = Store(path, N_FEATURES, retention=DAY)
    ids = [log(store, 1, start=i)[0][0] for i in range(6)]
    store.flush()
    age(path, "requests", "ts", 2 * DAY, "seq IN (1, 2, 5)")
    assert store.prune() == 2
    assert store.counts()["requests"] == 4
    age(path, "requests", "ts", 2 * DAY, "seq IN (3, 4)")
    assert store.prune() == 3
    assert store.counts()["requests"] == 1
    store.add_feedback(ids[5], 1)


def test_one_process_prunes_at_a_time(tmp_path):
    store, _, _ = filled(tmp_path / "p.db", retention=7 * DAY)
    other = journal.try_lock(tmp_path / "p.db.journal" / "prune.lock", create=True)  # another process prunes
    deleted = []
    waiting = threading.Thread(target=lambda: deleted.append(store.prune()))
    try:
        waiting.start()
        waiting.join(timeout=0.5)
        assert waiting.is_alive() and store.counts()["requests"] == 50  # waits for the other round to end
    finally:
        os.close(other)
    waiting.join(timeout=60)
    assert deleted == [31]


def test_the_writer_prunes_on_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "PRUNE_SECONDS", 0.0)  # a round at every turn of the writer
    store, _, _ = filled(tmp_path / "p.db", retention=7 * DAY)
    log(store, 1, start=1000)  # its writer starts, and prunes
    end = time.monotonic() + 60
    while store.counts()["requests"] != 21 and time.monotonic() < end:
        time.sleep(0.05)
    assert store.counts() == {"requests": 21, "predictions": 21, "feedback": 3}
