"""The prediction log (rareml.store) on a real SQLite file: windows, delayed labels, restarts and
concurrent writers."""
from __future__ import annotations

import json
import multiprocessing
import sqlite3

import numpy as np
import pytest

import rareml.store as store_module
from rareml.features import UNSEEN
from rareml.store import DuplicateFeedback, LogUnavailable, Store, UnknownPrediction

N_FEATURES = 3


def rows_of(n: int, start: int = 0) -> np.ndarray:
    """Encoded rows whose values float32 holds exactly: numbers, category codes, UNSEEN, missing."""
    rows = np.column_stack([np.arange(start, start + n) + 0.5, np.arange(n) % 4, np.full(n, 1e6)]).astype(float)
    rows[::3, 1] = UNSEEN
    rows[1::4, 2] = np.nan
    return rows


def log(store: Store, n: int, start: int = 0, version: str = "v1", sex: bool = True) -> tuple[list[str], dict]:
    """Log one request of n predictions; returns the ids and what was logged."""
    probability = (np.arange(start, start + n) % 97 + 1) / 100.0
    decision = (probability >= 0.5).astype(int)
    rows = rows_of(n, start)
    extras = [{"sex": ["F", "M", None][(start + i) % 3]} for i in range(n)] if sex else [{} for _ in range(n)]
    ids = store.add_predictions(version, probability, decision, rows, extras)
    assert len(ids) == n and len(set(ids)) == n
    return ids, {"probability": probability, "decision": decision, "rows": rows, "extras": extras}


def concat(*logged: dict) -> dict:
    return {k: [e for x in logged for e in x[k]] if k == "extras" else np.concatenate([x[k] for x in logged])
            for k in logged[0]}


def newest_first(logged: dict) -> dict:
    return {k: v[::-1] for k, v in logged.items()}


def assert_window(window, expected: dict) -> None:
    np.testing.assert_array_equal(window.probability, expected["probability"])
    np.testing.assert_array_equal(window.decision, expected["decision"])
    np.testing.assert_array_equal(window.rows, expected["rows"])
    assert window.rows.shape == (len(expected["probability"]), N_FEATURES)
    assert list(window.extras) == list(expected["extras"])


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "serving" / "predictions.db", N_FEATURES)


def test_window_is_newest_first_and_round_trips_rows(store):
    ids_a, a = log(store, 4)
    ids_b, b = log(store, 1, start=4)
    ids_c, c = log(store, 5, start=5)
    log(store, 3, version="other")
    expected = newest_first(concat(a, b, c))
    assert_window(store.window("v1", 100), expected)
    for size in (1, 5, 6, 10):
        assert_window(store.window("v1", size), {k: v[:size] for k, v in expected.items()})
    assert len(set(ids_a + ids_b + ids_c)) == 10
    assert len(store.window("nobody", 10).probability) == 0
    assert store.window("nobody", 10).rows.shape == (0, N_FEATURES)


def test_feedback_for_an_unknown_prediction_is_refused(store):
    ids, _ = log(store, 2)
    key = ids[0].rsplit("-", 1)[0]  # an id is <request key>-<position>
    for unknown in ["nope", "", "-", "0", "-0", ids[0][::-1], ids[0] + "x", "x" + ids[0], "f" * 32,
                    "0123456789abcdef-0", key, f"{key}-2", f"{key}--1", f"{key}-1-1", f"{key}- 1", f"{key}-1.0",
                    f"{key}-+1", ids[0].upper()]:
        with pytest.raises(UnknownPrediction):
            store.add_feedback(unknown, 1)
    assert len(store.labeled("v1", 10).label) == 0


def test_feedback_twice_is_refused_and_the_first_label_stays(store):
    ids, _ = log(store, 2)
    store.add_feedback(ids[1], 1)
    for label in (1, 0):
        with pytest.raises(DuplicateFeedback):
            store.add_feedback(ids[1], label)
    assert store.labeled("v1", 10).label.tolist() == [1]


def test_labeled_window_joins_each_label_to_its_prediction_newest_label_first(store):
    ids_a, a = log(store, 3)
    ids_b, b = log(store, 2, start=3)
    log(store, 2, start=5, version="other")
    both = concat(a, b)
    order = [4, 0, 2]  # labels arrive for ids 4, 0, 2 in this order
    for k, i in enumerate(order):
        store.add_feedback((ids_a + ids_b)[i], k % 2)
    labeled = store.labeled("v1", 10)
    newest = order[::-1]
    assert_window(labeled, {k: [v[i] for i in newest] if k == "extras" else v[newest] for k, v in both.items()})
    assert labeled.label.tolist() == [0, 1, 0]
    assert store.labeled("v1", 2).label.tolist() == [0, 1]
    assert len(store.labeled("other", 10).label) == 0


def test_everything_survives_a_restart(tmp_path):
    path = tmp_path / "p.db"
    first = Store(path, N_FEATURES)
    ids, logged = log(first, 6)
    first.add_feedback(ids[2], 1)
    window, labeled = first.window("v1", 100), first.labeled("v1", 100)
    del first

    again = Store(path, N_FEATURES)
    assert_window(again.window("v1", 100), newest_first(logged))
    assert_window(again.labeled("v1", 100), {k: v[2:3] for k, v in logged.items()})
    np.testing.assert_array_equal(again.labeled("v1", 100).label, labeled.label)
    with pytest.raises(DuplicateFeedback):
        again.add_feedback(ids[2], 0)
    again.add_feedback(ids[3], 0)
    more, _ = log(again, 2, start=6)
    assert not set(more) & set(ids)
    assert len(again.window("v1", 100).probability) == len(window.probability) + 2


def test_ping_fails_when_the_file_cannot_be_opened(tmp_path):
    (tmp_path / "not_a_dir").write_text("a regular file where the log's folder should be")
    with pytest.raises((OSError, sqlite3.Error)):
        Store(tmp_path / "not_a_dir" / "p.db", N_FEATURES).ping()
    Store(tmp_path / "ok" / "p.db", N_FEATURES).ping()




@pytest.mark.parametrize("alias", ["-01", "-\u0661",
                                   "-1.0", "-+1", "-1 "])  # \u0661: ARABIC-INDIC DIGIT ONE
def test_an_id_written_differently_is_not_a_second_prediction(store, alias):
    ids, _ = log(store, 2)
    key = ids[1].rsplit("-", 1)[0]
    store.add_feedback(ids[1], 1)
    with pytest.raises((UnknownPrediction, DuplicateFeedback)):
        store.add_feedback(key + alias, 0)
    assert store.labeled("v1", 10).label.tolist() == [1]


@pytest.mark.parametrize("junk", ["-\u00b2", "-" + "9" * 30, "-" + "9" * 5000])
def test_a_malformed_position_is_an_unknown_prediction(store, junk):  # \u00b2: SUPERSCRIPT TWO
    ids, _ = log(store, 1)
    with pytest.raises(UnknownPrediction):
        store.add_feedback(ids[0].rsplit("-", 1)[0] + junk, 1)


def _writer(path: str, worker: int, requests: int, barrier, queue) -> None:
    store = Store(path, N_FEATURES)
    barrier.wait()
    per_request = []
    for r in range(requests):
        ids, _ = log(store, 1 + r % 3, start=worker * 10_000 + r)
        store.add_feedback(ids[0], r % 2)
        per_request.append(ids)
    queue.put(per_request)


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "p.db"
    Store(path, N_FEATURES).ping()  # the file exists before the workers start, as with the server
    ctx = multiprocessing.get_context("spawn")
    barrier, queue, requests = ctx.Barrier(2), ctx.Queue(), 150
    workers = [ctx.Process(target=_writer, args=(str(path), w, requests, barrier, queue)) for w in range(2)]
    for p in workers:
        p.start()
    got = [queue.get(timeout=120) for _ in workers]
    for p in workers:
        p.join(timeout=60)
        assert p.exitcode == 0
    total = 2 * sum(1 + r % 3 for r in range(requests))
    all_ids = [pid for per_request in got for ids in per_request for pid in ids]
    assert len(set(all_ids)) == len(all_ids) == total
    store = Store(path, N_FEATURES)
    window = store.window("v1", 10 * total)
    assert len(window.probability) == total and len(store.labeled("v1", 10 * total).label) == 2 * requests
    starts = (window.rows[:, 0] - 0.5).astype(int).tolist()
    assert sorted(starts) == sorted(w * 10_000 + r + i for w in range(2) for r in range(requests)
                                    for i in range(1 + r % 3))
    for per_request in got:  # each id is known, and labeled once if it was the first of its request
        for ids in per_request[:20]:
            with pytest.raises(DuplicateFeedback):
                store.add_feedback(ids[0], 1)
            for pid in ids[1:]:
                store.add_feedback(pid, 1)


def test_an_invalid_label_is_not_reported_as_a_duplicate(store):
    ids, _ = log(store, 1)
    with pytest.raises(Exception) as caught:  # any refusal but "duplicate"
        store.add_feedback(ids[0], 2)
    assert not isinstance(caught.value, DuplicateFeedback)
    store.add_feedback(ids[0], 1)


def test_written_in_the_background_and_found_by_another_process_right_away(tmp_path):
    """Predictions reach the file through each process's writer thread (not per request); a label
    sent at once through another connection (another worker) still finds its prediction."""
    worker_a, worker_b = Store(tmp_path / "p.db", N_FEATURES), Store(tmp_path / "p.db", N_FEATURES)
    ids, _ = log(worker_a, 3)
    worker_b.add_feedback(ids[2], 1)  # waits for worker_a's writer, within 2 x FLUSH_SECONDS
    assert worker_b.labeled("v1", 10).label.tolist() == [1]
    many = [log(worker_a, 1, start=i)[0][0] for i in range(300)]  # more than FLUSH_REQUESTS wait: flushed
    assert worker_b.counts()["requests"] >= 1
    worker_b.add_feedback(many[-1], 0)
    assert sorted(worker_b.labeled("v1", 10).label.tolist()) == [0, 1]


def test_nothing_is_lost_while_the_log_cannot_be_written(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "BUSY_SECONDS", 0.01)
    store = Store(tmp_path / "log" / "p.db", N_FEATURES)
    log(store, 2)
    store.flush()
    blocker = sqlite3.connect(tmp_path / "log" / "p.db", timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the lock longer than the busy timeout
    log(store, 3, start=2)
    with pytest.raises(LogUnavailable, match="locked"):
        store.flush()
    assert not store.status().writable and store.status().pending_requests == 1
    blocker.rollback()
    blocker.close()
    store.flush()  # the predictions kept in memory are written now
    assert len(store.window("v1", 10).probability) == 5
    assert store.status().writable and store.status().pending_requests == 0


def test_a_nearly_full_disk_is_told_by_every_process_before_a_write_fails(store, monkeypatch):
    log(store, 2)
    assert store.status().writable
    free = store_module._free_bytes(store.path.parent)
    assert free is not None and free > 0
    monkeypatch.setattr(store_module, "MIN_FREE_BYTES", free + (1 << 30))  # as if this much were needed
    status = store.status()
    assert not status.writable and "disk is full" in status.reason and str(store.path.parent) not in status.reason
    monkeypatch.setattr(store_module, "MIN_FREE_BYTES", 0)
    assert store.status().writable


def test_the_request_as_sent_is_kept_and_labels_carry_their_record(store):
    from rareml.store import RAW_COLUMNS, RAW_ONE, RAW_RECORDS, pack_request, record_of

    one = {"age": 41, "job": "a level never seen", "note": "ignored"}
    batch = {"records": [{"age": 1, "job": "x"}, {"age": 2, "job": None}]}
    columns = {"columns": {"age": [5, 6, 7], "job": ["p", "q", "r"], "short": [1]}}
    ids = []
    for kind, body, n in ((RAW_ONE, one, 1), (RAW_RECORDS, batch, 2), (RAW_COLUMNS, columns, 3)):
        raw = pack_request(kind, json.dumps(body).encode())
        ids.append(store.add_predictions("v1", np.full(n, 0.5), np.ones(n, int), rows_of(n), [{}] * n, raw))
    assert record_of(None, 0) is None
    for pid, label in ((ids[0][0], 1), (ids[1][1], 0), (ids[2][2], 1)):
        store.add_feedback(pid, label)
    got = store.labelled_records()
    assert [g["prediction_id"] for g in got] == [ids[0][0], ids[1][1], ids[2][2]]
    assert [g["label"] for g in got] == [1, 0, 1]
    assert [g["record"] for g in got] == [one, {"age": 2, "job": None}, {"age": 7, "job": "r", "short": None}]
    assert all(g["ts"] > 0 and g["model_version"] == "v1" for g in got)
    assert store.labelled_records(since=got[-1]["ts"]) == got[-1:]
    store.add_feedback(ids[2][0], 0)  # another label of the same batch: its body parsed once for both
    assert store.labelled_records()[-1]["record"] == {"age": 5, "job": "p", "short": 1}


def test_a_log_of_the_first_release_gains_the_raw_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    old_schema = store_module._SCHEMA.replace(",\n    raw BLOB\n", "\n").replace(",\n    raw TEXT\n", "\n")
    assert "raw" not in old_schema
    with sqlite3.connect(path) as conn:
        conn.executescript(old_schema)
        conn.execute("INSERT INTO requests (key, ts, model_version, n, probability, decision, x) VALUES "
                     "(?, 1.0, 'v0', 1, ?, ?, ?)", ("a" * 16, np.float64(0.75).tobytes(), b"\1",
                                                    np.zeros(N_FEATURES, np.float32).tobytes()))
    store = Store(path, N_FEATURES)
    store.add_feedback("a" * 16 + "-0", 1)
    assert store.labelled_records() == [{"prediction_id": "a" * 16 + "-0", "ts": 1.0, "label": 1,
                                         "model_version": "v0", "probability": 0.75, "record": None}]
    log(store, 2)
    store.flush()
    assert store.counts()["requests"] == 2
