"""The prediction log on a full file system (a small tmpfs, so root is needed: CI runs as root):
refused rather than answered and lost, /ready's status says why, /metrics' reads still answer,
and the backlog drains in bounded transactions as soon as some space returns."""
from __future__ import annotations

import sqlite3
import subprocess
import time

import numpy as np
import pytest

import rareml.store as store_module
from rareml.store import LogUnavailable, Store

N_FEATURES = 40  # a census-sized row


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


ROW = np.random.default_rng(0).random((1, N_FEATURES))


def answer(store: Store) -> list[str]:
    return store.add_predictions("v1", np.array([0.25]), np.array([0]), ROW, [{"sex": "F"}])


def fill(folder) -> list:
    """Files that take all the space left, 256 KiB each (the last ones smaller)."""
    files = []
    for size in (256 << 10, 4 << 10):
        try:
            while True:
                files.append(folder / f"filler-{len(files):04d}")
                with open(files[-1], "wb") as f:
                    f.write(b"\0" * size)
        except OSError:
            pass
    return files


def wait_for(condition, seconds: float = 60) -> bool:
    """Poll (the writer works in the background); not a timed assertion: generous, for slow runners."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_a_full_disk_refuses_then_recovers_and_loses_nothing(small_disk, monkeypatch):
    monkeypatch.setattr(store_module, "BUSY_SECONDS", 0.05)
    path = small_disk / "serving" / "predictions.db"
    store = Store(path, N_FEATURES)
    ids = answer(store)
    store.flush()
    blocker = sqlite3.connect(path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")  # a backlog of ~2 MiB builds up first
    for _ in range(8000):
        ids += answer(store)
    fillers = fill(small_disk)
    blocker.rollback()
    blocker.close()

    with pytest.raises(LogUnavailable) as refused:  # the journal cannot take them: refused, not answered
        for _ in range(10_000):
            ids += answer(store)
    assert "No space left on device" in refused.value.reason and str(small_disk) not in refused.value.reason
    assert wait_for(lambda: "database or disk is full" in (store.status().reason or ""))
    status = store.status()
    assert not status.writable and status.pending_requests >= 8000 and "/" not in status.reason
    with pytest.raises(LogUnavailable):
        store.add_feedback(ids[0], 1)
    assert len(store.window("v1", 10).probability) >= 1  # what is in the log: /metrics answers
    assert store.counts()["requests"] >= 1

    waiting = status.pending_requests
    for filler in fillers[-4:]:  # 1 MiB back: less than the backlog, which drains part of it
        filler.unlink()
    assert wait_for(lambda: store.status().pending_requests < waiting)
    for filler in fillers[:-4]:
        filler.unlink()
    assert wait_for(lambda: store.status().writable and store.status().pending_requests == 0)
    with sqlite3.connect(path) as conn:
        keys = {k for (k,) in conn.execute("SELECT key FROM requests")}
    assert {pid.rsplit("-", 1)[0] for pid in ids} == keys  # every answered one; none of the refused
    for pid in ids[:3] + ids[-3:]:
        store.add_feedback(pid, 1)
    store.close()
    assert not [p for p in (small_disk / "serving" / "predictions.db.journal").iterdir() if p.is_dir()]


def test_a_full_disk_with_nothing_waiting_recovers_unaided(small_disk):
    """/ready says 503, so no request comes to try again: the writer's own small writes do."""
    store = Store(small_disk / "predictions.db", N_FEATURES)
    answer(store)
    store.flush()
    refused_then_recovered(store, fill(small_disk))


def test_a_process_whose_very_first_write_meets_a_full_disk_recovers_unaided(small_disk):
    """A gunicorn worker that had answered nothing before the disk filled: its writer was not
    running yet, and it is what clears the problem once space returns (seen in CI: /ready 503 for
    good in that worker)."""
    other = Store(small_disk / "predictions.db", N_FEATURES)  # another process made the log before
    answer(other)
    other.close()
    fillers = fill(small_disk)
    refused_then_recovered(Store(small_disk / "predictions.db", N_FEATURES), fillers)


def refused_then_recovered(store: Store, fillers: list) -> None:
    """Answer until the full disk refuses; free it; the store must say writable again by itself."""
    with pytest.raises(LogUnavailable):
        for _ in range(10_000):
            answer(store)
    assert not store.status().writable
    for filler in fillers:
        filler.unlink()
    assert wait_for(lambda: store.status().writable)
    answer(store)
    store.close()
