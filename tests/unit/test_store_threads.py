"""The prediction log used by several threads of one process at once (gunicorn gthread workers):
predictions, labels, alerts and reads together, nothing lost, no transaction conflict."""
from __future__ import annotations

import threading

import pytest

from rareml.store import DuplicateFeedback, Store
from tests.unit.test_store import N_FEATURES, log

THREADS, REQUESTS = 8, 150


def test_threads_adding_predictions_labels_and_alerts_at_once(tmp_path):
    store = Store(tmp_path / "p.db", N_FEATURES)
    barrier, errors, got = threading.Barrier(THREADS), [], {}

    def work(t: int) -> None:
        try:
            barrier.wait()
            mine = []
            for r in range(REQUESTS):
                ids, _ = log(store, 1 + r % 2, start=t * 10_000 + r)
                mine.append(ids)
                if r % 2 == 0:
                    store.add_feedback(ids[0], r % 4 // 2)  # at once, from this thread
                if r % 25 == 0:
                    store.add_alerts([{"status": "firing", "labels": {"alertname": f"t{t}"}}])
                    assert len(store.window("v1", 50).probability) > 0
                    store.counts()
                    store.labeled("v1", 50)
            got[t] = mine
        except Exception as exc:  # noqa: BLE001 (reported below, with its thread)
            errors.append((t, repr(exc)))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors
    store.flush()
    requests = [ids for t in range(THREADS) for ids in got[t]]
    assert store.counts() == {"requests": THREADS * REQUESTS, "predictions": sum(map(len, requests)),
                              "feedback": THREADS * REQUESTS // 2}
    assert len(store.alerts(1000)) == THREADS * (REQUESTS // 25)
    for r, ids in enumerate(requests):
        if r % REQUESTS % 2 == 0:
            with pytest.raises(DuplicateFeedback):
                store.add_feedback(ids[0], 1)
        elif len(ids) > 1:
            store.add_feedback(ids[1], 1)
    assert store.status().writable and store.status().pending_requests == 0
