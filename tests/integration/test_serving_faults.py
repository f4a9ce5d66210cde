"""The API under faults, as users would meet them, on real gunicorn with 2 workers: slow clients,
kill -9 of a worker and of the whole server under load, the log deleted or its disk full while
serving, SIGTERM under load, a bad chunked body. Every answered prediction must be in the log."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Self

import pandas as pd
import pytest

from rareml.features import to_records
from rareml.model import load_model
from rareml.store import PROBE_SECONDS
from tests.integration.test_gunicorn import Server, call

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def records(trained) -> list[dict]:
    model = load_model(trained / "artifacts" / "model")
    return to_records(pd.read_parquet(trained / "artifacts" / "test.parquet").head(300), model.schema)


@pytest.fixture()
def start(trained, tmp_path):
    servers = []

    def start(*extra: str, db: Path | None = None, env: dict | None = None, wait: bool = True) -> Server:
        server = Server(trained / "artifacts", db or tmp_path / "log.db", tmp_path / "server.log", "--drain", "0",
                        *extra, env=env)
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


class Load:
    """Threads sending POST /predict over kept-alive connections until stopped: what was answered,
    with when each request was sent."""

    def __init__(self, port: int, records: list[dict], threads: int = 4):
        self.port, self.bodies = port, [json.dumps(r).encode() for r in records]
        self.answered: list[tuple[float, str]] = []  # (time sent, prediction id) of every 200
        self.statuses: Counter = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _run(self, offset: int) -> None:
        conn, i, deadline = None, offset, time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                sent = time.time()
                conn.request("POST", "/predict", self.bodies[i % len(self.bodies)], {"Content-Type": "application/json"})
                response = conn.getresponse()
                body = response.read()
                self.statuses[response.status] += 1
                if response.status == 200:
                    self.answered.append((sent, json.loads(body)["prediction_id"]))
            except (OSError, http.client.HTTPException):
                self.statuses["connection error"] += 1
                conn = None
                time.sleep(0.01)
            i += 1


def logged_keys(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {key for (key,) in conn.execute("SELECT key FROM requests")}


def missing(answered: list[tuple[float, str]], db: Path, after: float = 0.0) -> list[str]:
    keys = logged_keys(db)
    return [pid for sent, pid in answered if sent >= after and pid.rsplit("-", 1)[0] not in keys]


def test_slow_clients_do_not_stall_the_api(start, records):
    """8 connections sending their headers a byte at a time, or announcing a body and stalling,
    used to hold both sync workers (/health p50 29.5 s): now a normal client is answered at once."""
    server = start("--read-timeout", "4")
    slow = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
    for i, s in enumerate(slow):
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n" if i % 2 else
                  b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
    slowest, body = 0.0, json.dumps(records[0]).encode()
    for i in range(40):
        for s in slow[1::2]:
            s.send(b"X")  # one more header byte
        started = time.perf_counter()
        assert call(server.port, "GET", "/health")[0] == 200
        assert call(server.port, "POST", "/predict", body)[0] == 200
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 2.0, f"a request took {slowest:.2f} s beside 8 slow clients"
    slow[0].settimeout(10)  # past the read timeout, a started request is told why it is dropped
    assert b"408" in slow[0].recv(1000).split(b"\r\n")[0]
    for s in slow:
        s.close()


def test_kill_of_a_worker_under_load_loses_no_answered_prediction(start, records, tmp_path):
    server = start()
    with Load(server.port, records) as load:
        time.sleep(1.5)
        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)
        time.sleep(2.5)
    answered = list(load.answered)
    assert len(answered) > 200 and not [s for s in load.statuses if isinstance(s, int) and s >= 500], load.statuses
    # labels for predictions the killed worker answered reach them while the server runs
    for _, pid in answered[::max(1, len(answered) // 50)]:
        assert call(server.port, "POST", "/feedback", json.dumps({"prediction_id": pid, "label": 1}).encode())[0] \
            in (200, 409)
    server.stop()
    assert missing(answered, tmp_path / "log.db") == []


def test_a_worker_that_exits_is_replaced_and_the_server_keeps_serving(start, records):
    """A worker's own graceful exit (SIGTERM to it alone, as a group kill or gunicorn's timeout abort
    gives) once removed the metric files of every worker: the replacement could not boot, and the
    master stopped the whole API."""
    server = start()
    body = json.dumps(records[0]).encode()
    for round_ in range(2):
        victim = server.workers()[0]
        os.kill(victim, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (victim in server.workers() or len(server.workers()) < 2):
            time.sleep(0.2)
        assert victim not in server.workers() and len(server.workers()) == 2, f"round {round_}: not replaced"
        server.wait_ready(30)
        for _ in range(20):  # both workers, the new one included, answer and count
            assert call(server.port, "POST", "/predict", body)[0] == 200
        status, metrics = call(server.port, "GET", "/metrics")
        assert status == 200 and b"rareml_requests_total" in metrics
    assert server.proc.poll() is None


def test_kill_of_the_whole_server_under_load_loses_no_answered_prediction(start, records, tmp_path):
    server = start()
    with Load(server.port, records) as load:
        time.sleep(2.0)
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=30)
    answered = list(load.answered)
    assert len(answered) > 200
    again = start()  # same log: the journals of the killed processes are replayed before serving
    again.stop()
    assert missing(answered, tmp_path / "log.db") == []


def test_a_log_deleted_while_serving_is_recreated(start, records, tmp_path):
    db = tmp_path / "log.db"
    server = start()
    with Load(server.port, records) as load:
        time.sleep(1.0)
        deleted = time.time()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        time.sleep(2.0)
    after = [item for item in load.answered if item[0] > deleted]
    assert len(after) > 100
    assert call(server.port, "GET", "/ready")[0] == 200
    server.stop()
    assert db.exists() and missing(after, db) == []


@pytest.fixture()
def small_disk(tmp_path):
    """A 16 MiB tmpfs of our own (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True, timeout=30)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def fill(folder: Path) -> Path:
    """A file taking every free byte of `folder`'s filesystem."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush (and fail) at close
        try:
            for _ in range(10_000):
                if not f.write(b"\0" * 65536):
                    break
        except OSError:
            pass
    return filler


def test_a_full_disk_is_told_refused_and_recovered_from(start, records, small_disk):
    db = small_disk / "log.db"
    # the metric files are memory-mapped: on a full disk their growth is a SIGBUS, so they live elsewhere
    server = start(db=db, env={"PROMETHEUS_MULTIPROC_DIR": str(small_disk.parent / "metrics")})
    port, body = server.port, json.dumps(records[0]).encode()
    before = [json.loads(call(port, "POST", "/predict", body)[1])["prediction_id"] for _ in range(20)]
    filler = fill(small_disk)
    statuses, answered = Counter(), []
    for _ in range(3000):  # until the log refuses: answered ones are journaled or queued
        status, out = call(port, "POST", "/predict", body)
        statuses[status] += 1
        if status == 200:
            answered.append(json.loads(out)["prediction_id"])
        elif status == 503:
            assert json.loads(out)["reason"] == "log_unavailable"
            break
    assert statuses[503] == 1 and not [s for s in statuses if s not in (200, 503)], statuses
    time.sleep(0.3)
    status, out = call(port, "GET", "/ready")
    assert status == 503 and "/" not in json.loads(out)["reason"], out
    assert call(port, "GET", "/metrics")[0] == 200
    status, out = call(port, "POST", "/feedback", json.dumps({"prediction_id": before[0], "label": 1}).encode())
    assert status == 503 and json.loads(out)["reason"] == "log_unavailable", out
    filler.unlink()  # space returns: the backlog drains and the log serves again
    for _ in range(100):
        if call(port, "GET", "/ready")[0] == 200:
            break
        time.sleep(0.1)
    # that was one worker; the other's probe (each PROBE_SECONDS) clears its problem soon after
    time.sleep(2.5 * PROBE_SECONDS)
    for _ in range(8):
        status, out = call(port, "GET", "/ready")
        assert status == 200, out
    assert call(port, "POST", "/feedback", json.dumps({"prediction_id": before[0], "label": 0}).encode())[0] == 200
    assert call(port, "POST", "/predict", body)[0] == 200
    server.stop()
    keys = logged_keys(db)
    assert [pid for pid in before + answered if pid.rsplit("-", 1)[0] not in keys] == []


def test_sigterm_drains_then_stops_with_every_accepted_request_answered(start, records):
    server = start("--drain", "2")
    body = json.dumps({"records": records[:300]}).encode()
    results: list = []

    def send() -> None:
        try:
            results.append(call(server.port, "POST", "/predict/batch", body)[0])
        except OSError as exc:
            results.append(repr(exc))

    threads = [threading.Thread(target=send) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    stopped = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    status, out = call(server.port, "GET", "/ready")
    assert status == 503 and "shutting down" in json.loads(out)["reason"]
    assert call(server.port, "POST", "/predict", json.dumps(records[0]).encode())[0] == 200  # still answering
    for t in threads:
        t.join(timeout=60)
    assert results == [200] * 16
    assert server.proc.wait(timeout=60) == 0
    assert time.monotonic() - stopped >= 2.0


def test_a_chunked_body_over_the_limit_is_413(start):
    server = start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    chunk = b" " * 2**20
    conn.request("POST", "/predict/batch", body=(chunk for _ in range(17)), encode_chunked=True,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["reason"] == "body_too_large"


def test_a_prometheus_folder_given_by_the_user_is_neither_emptied_nor_removed(start, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("the user's")
    server = start(env={"PROMETHEUS_MULTIPROC_DIR": str(mine)})
    assert call(server.port, "GET", "/metrics")[0] == 200
    server.stop()
    assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"]
