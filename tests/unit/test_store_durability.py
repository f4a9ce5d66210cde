"""The prediction log keeps every answered prediction: through SIGKILL of the process that answered
it (its journal is replayed), a log file deleted under it (created again), a normal exit, a fork."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import rareml.store as store_module
from rareml import journal
from rareml.store import DuplicateFeedback, LogUnavailable, Store
from tests.unit.test_store import N_FEATURES, log

ROOT = Path(__file__).resolve().parents[2]

# A process that answers requests through a Store and prints each request's ids once they are
# returned (answered), then is killed with SIGKILL by itself or by the test.
CHILD = textwrap.dedent("""
    import json, os, sys, threading
    import numpy as np
    import rareml.store as store_module
    from rareml.store import Store

    path, mode, requests = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = Store(path, 3)
    if mode == "exit":  # the writer writes at exit only (and maybe the first request at its start)
        store_module.FLUSH_SECONDS, store_module.FLUSH_REQUESTS = 3600, 10**9
    elif mode != "writer":  # the writer never runs: what is answered is in the journal only
        store._start_writer = lambda: None
    printing = threading.Lock()

    def answer(thread):
        for r in range(requests):
            n = 1 + r % 3
            ids = store.add_predictions("v1", np.full(n, 0.25), np.zeros(n, int), np.full((n, 3), r, float),
                                        [{"sex": "F"}] * n)
            if mode == "writer" and r % 5 == 0:
                store.add_feedback(ids[0], 1)
                with printing:
                    print("label", ids[0], flush=True)
            with printing:
                print(json.dumps(ids), flush=True)

    if mode == "deleted-journal":  # the journal deleted under it while the log cannot be written
        import shutil, sqlite3
        store_module.BUSY_SECONDS = 0.01
        answer(0)
        shutil.rmtree(path + ".journal")
        blocker = sqlite3.connect(path, timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            store.flush()
        except store_module.LogUnavailable:
            pass
        answer(1)
    elif mode == "writer":
        threads = [threading.Thread(target=answer, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        answer(0)
    if mode == "exit":
        sys.exit(0)
    os.kill(os.getpid(), 9)
""")


def run_child(path: Path, mode: str, requests: int = 200) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(requests)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == (0 if mode == "exit" else -signal.SIGKILL), done.stderr
    return done


def answered(stdout: str) -> tuple[list[str], list[str]]:
    """The ids printed (whole lines only: a line cut by the kill is not an answer) and the labels."""
    ids, labels = [], []
    for line in stdout.splitlines()[:-1] if not stdout.endswith("\n") else stdout.splitlines():
        if line.startswith("label "):
            labels.append(line.split()[1])
        else:
            ids.extend(json.loads(line))
    return ids, labels


def requests_in(path: Path) -> int:
    if not path.exists():
        return 0
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM requests").fetchone()[0]


def assert_all_found(store: Store, ids: list[str]) -> None:
    for pid in ids:
        store.add_feedback(pid, 0)  # raises UnknownPrediction if it was lost
    assert len(store.labeled("v1", 10 * len(ids)).label) >= len(ids)


def test_predictions_answered_then_killed_are_replayed(tmp_path):
    path = tmp_path / "p.db"
    ids, _ = answered(run_child(path, "unflushed").stdout)
    assert len(ids) == sum(1 + r % 3 for r in range(200))
    assert requests_in(path) == 0  # none was written to the log before the kill
    store = Store(path, N_FEATURES)
    assert store.replay() == 200
    assert store.status().replayed == 200 and store.replay() == 0
    assert not [p for p in (tmp_path / "p.db.journal").iterdir() if p.is_dir()]  # its journal is gone
    assert_all_found(store, ids)


def test_a_label_for_a_killed_workers_prediction_finds_it(tmp_path):
    """No replay() called: the label itself looks in the journals."""
    path = tmp_path / "p.db"
    other_worker = Store(path, N_FEATURES)
    other_worker.ping()
    ids, _ = answered(run_child(path, "unflushed", requests=50).stdout)
    other_worker.add_feedback(ids[-1], 1)
    assert other_worker.labeled("v1", 10).label.tolist() == [1]
    assert_all_found(other_worker, ids[:-1])


def test_killed_under_load_loses_no_answered_prediction_or_label(tmp_path):
    """Four threads answering, the writer running, the process killed at some moment: every id it
    printed is found by another worker, and every label it acknowledged is there."""
    path = tmp_path / "p.db"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), "writer", "100000"], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    lines = [child.stdout.readline() for _ in range(3000)]
    child.send_signal(signal.SIGKILL)
    lines.append(child.stdout.read())
    child.wait(timeout=60)
    ids, labels = answered("".join(lines))
    assert len(ids) >= 3000 and len(labels) >= 100
    worker = Store(path, N_FEATURES)
    for pid in labels:
        with pytest.raises(DuplicateFeedback):
            worker.add_feedback(pid, 0)
    labeled = set(labels)
    for pid in ids:
        if pid not in labeled:
            try:
                worker.add_feedback(pid, 0)
            except DuplicateFeedback:  # labeled just before the kill, not yet printed
                pass


def test_the_journal_deleted_under_a_process_is_written_again(tmp_path):
    path = tmp_path / "p.db"
    Store(path, N_FEATURES).ping()
    ids, _ = answered(run_child(path, "deleted-journal", requests=30).stdout)
    assert len(ids) == 2 * sum(1 + r % 3 for r in range(30))
    store = Store(path, N_FEATURES)
    assert store.replay() == 60
    assert_all_found(store, ids)


def test_a_normal_exit_writes_everything_and_removes_its_journal(tmp_path):
    path = tmp_path / "p.db"
    ids, _ = answered(run_child(path, "exit", requests=40).stdout)
    assert requests_in(path) == 40
    assert not [p for p in (tmp_path / "p.db.journal").iterdir() if p.is_dir()]
    assert_all_found(Store(path, N_FEATURES), ids)


def no_writer(store: Store) -> Store:
    store._start_writer = lambda: None  # only explicit flushes write: what is queued stays queued
    return store


@pytest.mark.parametrize("also", [(), ("-wal", "-shm")])
def test_a_log_deleted_under_a_live_store_is_created_again_with_the_queue(tmp_path, also):
    path = tmp_path / "serving" / "p.db"
    store = no_writer(Store(path, N_FEATURES))
    log(store, 2)
    store.flush()
    unaware = sqlite3.connect(path, isolation_level=None)  # another worker's, on the old file until it looks
    unaware.execute("INSERT INTO alerts (received, status, alertname, labels, annotations) VALUES (0, '', '', '', '')")
    queued, _ = log(store, 3, start=2)
    for suffix in ("", *also):
        os.unlink(f"{path}{suffix}")
    later, _ = log(store, 1, start=5)
    store.flush()
    unaware.execute("INSERT INTO alerts (received, status, alertname, labels, annotations) VALUES (0, '', '', '', '')")
    assert path.exists() and requests_in(path) == 2
    other = Store(path, N_FEATURES)  # another worker, opened on the new file
    assert sorted(other.window("v1", 10).rows[:, 0].tolist()) == [2.5, 3.5, 4.5, 5.5]
    assert_all_found(other, queued + later)
    with sqlite3.connect(path) as conn:  # not mixed with the old file's write-ahead log
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM alerts").fetchone() == (0,)
    unaware.close()


def test_a_log_deleted_during_a_write_is_written_again_into_the_new_file(tmp_path):
    path = tmp_path / "p.db"
    store = no_writer(Store(path, N_FEATURES))
    log(store, 1)
    store.flush()
    ids, _ = log(store, 2, start=1)
    checked, deleted = store._conn, []

    def then_deleted():  # the file goes after the store checked it, before the commit
        conn = checked()
        if not deleted:
            path.unlink()
            deleted.append(path)
        return conn

    store._conn = then_deleted
    store.flush()
    assert deleted and requests_in(path) == 1  # the new file: the chunk was written again
    assert_all_found(Store(path, N_FEATURES), ids)


def _fork_child(queue) -> None:
    store = _fork_child.store  # inherited from the parent by fork
    queue.put(store.add_predictions("v1", np.array([0.5]), np.array([1]), np.zeros((1, N_FEATURES)), [{}]))


def test_a_forked_child_keeps_its_rows_apart_from_its_parents(tmp_path):
    path = tmp_path / "p.db"
    parent = no_writer(Store(path, N_FEATURES))
    mine, _ = log(parent, 2)
    folder = parent._backlog._journal.folder
    _fork_child.store = parent
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_fork_child, args=(queue,))
    with parent._backlog._lock:  # another thread of the parent was adding a prediction as it forked
        child.start()
    try:
        theirs = queue.get(timeout=60)
        child.join(timeout=60)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert journal.try_lock(folder / "lock") is None  # the parent's journal is still the parent's
    assert parent.status().pending_requests == 1 and requests_in(path) == 0  # the child wrote none of it
    parent.flush()
    assert parent.replay() == 1  # the child's own journal (it exited without writing)
    assert_all_found(parent, mine + theirs)


def test_replay_skips_a_torn_record_and_keeps_what_it_cannot_read(tmp_path):
    path = tmp_path / "p.db"
    ids, _ = answered(run_child(path, "unflushed", requests=10).stdout)
    root = tmp_path / "p.db.journal"
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    (segment,) = folder.glob("*.seg")
    with open(segment, "ab") as f:
        f.write(journal.encode("f" * 16, 0.0, "v1", 1, b"\0" * 8, b"\0", b"\0" * 12, None, None)[:-5])  # cut short
    strange = root / "12-0123abcd"  # named like a journal, but of a format this code does not know
    strange.mkdir()
    (strange / "lock").touch()
    (strange / "00000001.seg").write_bytes(b"something else entirely")
    (root / "notes").mkdir()  # not named like a journal: never touched
    (root / "notes" / "x").write_text("keep me")
    store = Store(path, N_FEATURES)
    assert store.replay() == 10
    assert not folder.exists() and strange.exists() and (root / "notes" / "x").read_text() == "keep me"
    assert_all_found(store, ids)
    with pytest.raises(store_module.UnknownPrediction):
        store.add_feedback("f" * 16 + "-0", 1)


def test_the_byte_bound_refuses_predictions_rather_than_dropping_any(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "BUSY_SECONDS", 0.01)
    path = tmp_path / "p.db"
    store = Store(path, N_FEATURES, max_pending_bytes=64 << 10)
    log(store, 1)
    store.flush()
    blocker = sqlite3.connect(path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")  # the log cannot be written for a while
    ids = []
    with pytest.raises(LogUnavailable, match="backlog full") as refused:
        for i in range(100_000):
            ids += log(store, 1, start=i + 1)[0]
    assert 100 < len(ids) < 1000 and str(tmp_path) not in refused.value.reason
    status = store.status()
    assert not status.writable and "backlog full" in status.reason and status.pending_bytes <= 64 << 10
    assert status.pending_requests == len(ids)
    blocker.rollback()
    blocker.close()
    store.flush()
    assert requests_in(path) == len(ids) + 1  # every answered one, and none of the refused
    assert_all_found(store, ids)
    log(store, 1)  # accepted again
    assert store.status().writable


def test_a_journal_of_the_first_format_is_replayed_after_an_upgrade(tmp_path):
    """A server of the previous release was killed; this release replays its journal (no raw body)."""
    import struct
    import zlib

    path = tmp_path / "p.db"
    folder = tmp_path / "p.db.journal" / "12-0123abcd"
    folder.mkdir(parents=True)
    (folder / "lock").touch()
    x = np.arange(N_FEATURES, dtype=np.float32).tobytes()
    payload = struct.pack("<16sdIHI", b"b" * 16, 5.0, 1, 2, 0) + b"v0" + np.float64(0.25).tobytes() + b"\0" + x
    record = struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
    (folder / "00000001.seg").write_bytes(b"rareml-journal-1\n" + record)
    store = Store(path, N_FEATURES)
    assert store.replay() == 1 and not folder.exists()
    store.add_feedback("b" * 16 + "-0", 0)
    assert store.labelled_records() == [{"prediction_id": "b" * 16 + "-0", "ts": 5.0, "label": 0,
                                         "model_version": "v0", "probability": 0.25, "record": None}]
