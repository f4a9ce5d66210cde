"""Serving speed, measured side by side in one run on one machine:

- requests/s and p50/p99 latency of POST /predict (one real record per request, cycling through
  the test split) against a bare GET /health of the same gunicorn server (target: >= 50%);
- rows/s of POST /predict/batch (1,000-row batches) against raw `Booster.inplace_predict` on the
  same rows in this process (target: >= 50%);
- latency of a normal client (one request at a time, GET /health and POST /predict) alone, and
  beside 8 slow clients (half send their headers a byte every 2 s, half announce a body and
  stall): target p99 under 100 ms.

Load comes from wrk (Debian package `wrk`; `make bench-serve` installs it). The server runs as
`make serve` runs it: `04_serve.py` under gunicorn, here on a temporary port and prediction log.
Usage: python benchmarks/serve.py [--artifacts artifacts] [--seconds 5] [--rounds 5] [--workers 2]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rareml.features import to_records
from rareml.model import load_model
from rareml.processes import free_port, stop_group, wait_http


def lua_script(path: Path, endpoint: str, bodies: list[str]) -> Path:
    """A wrk script that POSTs the bodies in turn. One body is set once and sent as it is: building
    a 1.2 MB batch request in Lua for each call would cost the load generator, on the server's
    cores, more than some of what is measured."""
    if len(bodies) == 1:
        path.write_text(f"""wrk.method = "POST"
wrk.path = "{endpoint}"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{bodies[0]}]==]
""")
        return path
    items = ",\n".join(f"[==[{b}]==]" for b in bodies)
    path.write_text(f"""local bodies = {{
{items}
}}
local i = 0
local headers = {{["Content-Type"] = "application/json"}}
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", "{endpoint}", headers, bodies[i])
end
""")
    return path


def wrk(url: str, seconds: int, connections: int, script: Path | None = None) -> dict:
    cmd = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency", "--timeout", "10s"]
    out = subprocess.run(cmd + (["-s", str(script)] if script else []) + [url], capture_output=True, text=True,
                         check=True, timeout=seconds + 60).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": ms("50%"), "p99_ms": ms("99%"), "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errors.group(1) if errors else None}


@contextlib.contextmanager
def slow_clients(port: int, n: int = 8):
    """`n` connections that hold a request open: half send their headers a byte every 2 s, half
    announce a 100 kB body and send one byte of it."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    for i, s in enumerate(socks):
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n" if i % 2 else
                  b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{")
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(2.0):
            for s in socks[1::2]:
                with contextlib.suppress(OSError):
                    s.send(b"X")

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for s in socks:
            s.close()


def probe(port: int, seconds: float, body: bytes) -> dict:
    """A normal client: GET /health and POST /predict in turn, one at a time, new connection each."""
    times: dict[str, list[float]] = {"health": [], "predict": []}
    failed = {"health": 0, "predict": 0}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, method, path, data in (("health", "GET", "/health", None), ("predict", "POST", "/predict", body)):
            started = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request(method, path, data, {"Content-Type": "application/json"} if data else {})
                conn.getresponse().read()
            except OSError:  # no answer within 30 s (a server stalled by the slow clients): counted as 30 s
                failed[name] += 1
            finally:
                conn.close()
            times[name].append((time.perf_counter() - started) * 1e3)
        time.sleep(0.02)
    return {name: {"n": len(v), "p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99)),
                   "max_ms": max(v), "unanswered": failed[name]} for name, v in times.items()}


def interleaved(rounds: int, first, second) -> tuple[dict, dict]:
    """`first` and `second` measured in turn `rounds` times: a burst of load from elsewhere on a
    shared machine then falls on both sides. Each result is the round with the median ratio
    (second / first), with every round's requests/s and ratio kept beside it."""
    pairs = [(first(), second()) for _ in range(rounds)]
    ratios = [b["requests_per_s"] / a["requests_per_s"] for a, b in pairs]
    a, b = pairs[int(np.argsort(ratios)[len(ratios) // 2])]
    return (a | {"rounds_per_s": [p[0]["requests_per_s"] for p in pairs]},
            b | {"rounds_per_s": [p[1]["requests_per_s"] for p in pairs], "round_ratios": ratios})


def describe(model) -> str:
    """The model's members as the table says them: "xgboost (389 trees)", "blend of linear 0.4, xgboost 0.6"."""
    parts = []
    for m in model.members:
        trees = f" ({m.entry['trees']} trees)" if "trees" in m.entry else ""
        parts.append(m.family + trees + (f" {m.weight:.2f}" if len(model.members) > 1 else ""))
    return parts[0] if len(parts) == 1 else "blend of " + ", ".join(parts)


def raw_rows_per_s(model, rows: np.ndarray, seconds: float = 5) -> float:
    """The members' uncalibrated scores for the encoded rows, as the server's batch path computes them."""
    x = model.encoder.model_rows(rows)
    model.raw_rows(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.raw_rows(x)
        n += 1
    return n * len(x) / (time.perf_counter() - start)


def batch_breakdown(model, records: list[dict], repeats: int = 30) -> dict[str, float]:
    """Milliseconds per 1,000-record batch for each step of the batch path, in this process, with
    one XGBoost thread as each of 2 workers on 2 cores has."""
    import orjson

    body = orjson.dumps({"records": records})
    model.threads(1)
    steps = {"parse JSON": lambda: orjson.loads(body), "validate and encode": lambda: model.encoder.encode_many(records),
             "predict (1 thread)": lambda: model.predict_rows(model.encoder.model_rows(rows)),
             "answer JSON": lambda: orjson.dumps({"predictions": [{"probability": p, "decision": 0, "threshold": 0.5,
                                                  "model_version": "x", "prediction_id": f"{i:016x}-{i}"}
                                                 for i, p in enumerate(probability.tolist())]})}
    rows, _ = model.encoder.encode_many(records)
    probability = model.predict_rows(model.encoder.model_rows(rows))
    gc.collect()
    gc.freeze()  # as each worker does after loading
    out = {}
    for name, step in steps.items():
        step()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        out[name] = (time.perf_counter() - start) / repeats * 1e3
    model.threads(os.cpu_count() or 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default=ROOT / "artifacts", type=Path)
    parser.add_argument("--seconds", default=5, type=int)
    parser.add_argument("--rounds", default=5, type=int, help="/health and /predict measured in turn this often")
    parser.add_argument("--workers", default=2, type=int)
    parser.add_argument("--connections", default=8, type=int)
    parser.add_argument("--out", default=ROOT / "benchmarks" / "results", type=Path)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("error: wrk not found: apt-get install wrk (or run `make bench-serve`)")
    model = load_model(args.artifacts / "model")
    test = pd.read_parquet(args.artifacts / "test.parquet").sample(frac=1.0, random_state=0)
    records = to_records(test.head(1000), model.schema)
    rows, _ = model.encoder.encode_many(records)
    work = Path(tempfile.mkdtemp(prefix="rareml-bench-serve-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(work / "metrics")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "04_serve.py"), "--artifacts", str(args.artifacts),
                             "--port", str(port), "--workers", str(args.workers), "--db", str(work / "log.db")],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "w"),  # noqa: SIM115
                            start_new_session=True)
    try:
        wait_http(url + "/ready", proc, log=work / "server.log")
        one = lua_script(work / "predict.lua", "/predict", [json.dumps(r) for r in records[:500]])
        batch = lua_script(work / "batch.lua", "/predict/batch", [json.dumps({"records": records})])
        wrk(url + "/health", 2, args.connections)  # warm-up
        health, predict = interleaved(args.rounds, lambda: wrk(url + "/health", args.seconds, args.connections),
                                      lambda: wrk(url, args.seconds, args.connections, one))
        batched = wrk(url, args.seconds, args.workers, batch)
        columns = {name: [r[name] for r in records] for name in model.schema.names}
        by_column = wrk(url, args.seconds, args.workers,
                        lua_script(work / "columns.lua", "/predict/batch", [json.dumps({"columns": columns})]))
        record = json.dumps(records[0]).encode()
        alone = probe(port, args.seconds, record)
        with slow_clients(port, 8):
            beside_slow = probe(port, args.seconds, record)
    finally:  # the whole process group: the master and its workers, whatever state they are in
        stop_group(proc)
    raw = raw_rows_per_s(model, rows)
    breakdown = batch_breakdown(model, records)
    batch_rows = batched["requests_per_s"] * len(records)
    column_rows = by_column["requests_per_s"] * len(records)
    result = {
        "model_version": model.version, "family": model.kind,
        "members": [m.entry for m in model.members], "workers": args.workers,
        "connections": args.connections, "seconds": args.seconds,
        "machine": f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "health": health, "predict": predict, "batch": batched | {"rows_per_s": batch_rows},
        "batch_columns": by_column | {"rows_per_s": column_rows},
        "raw_inplace_predict_rows_per_s": raw, "batch_breakdown_ms": breakdown,
        "normal_client_alone": alone, "normal_client_beside_8_slow_clients": beside_slow,
        "predict_vs_health": predict["requests_per_s"] / health["requests_per_s"],
        "batch_vs_raw": batch_rows / raw, "batch_columns_vs_raw": column_rows / raw}
    shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    table = (f"# Serving speed ({time.strftime('%Y-%m-%d')}, {result['machine']})\n\n"
             f"Model {model.version} ({describe(model)}); gunicorn with {args.workers} buffered threaded workers; "
             f"wrk with {args.connections} connections (batch: {args.workers}), {args.seconds} s per row; "
             "server and load share the machine.\n\n"
             "| endpoint | requests/s | p50 ms | p99 ms | non-2xx |\n|---|---|---|---|---|\n" +
             "".join(f"| {name} | {r['requests_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['non_2xx']} |\n"
                     for name, r in (("GET /health", health), ("POST /predict", predict),
                                     ("POST /predict/batch (1,000 records)", batched),
                                     ("POST /predict/batch (1,000 rows as columns)", by_column))) +
             f"\n- /predict vs /health throughput: **{result['predict_vs_health']:.2f}x** (target >= 0.5; the median of "
             f"{args.rounds} rounds measured in turn: {', '.join(f'{r:.2f}' for r in predict['round_ratios'])})\n"
             f"- /predict/batch {batch_rows:,.0f} rows/s vs raw inplace_predict {raw:,.0f} rows/s: "
             f"**{result['batch_vs_raw']:.2f}x** (target >= 0.5)\n"
             f"- /predict/batch with columns {column_rows:,.0f} rows/s: **{result['batch_columns_vs_raw']:.2f}x**\n"
             "\nA normal client (one request at a time), alone and beside 8 slow clients (target p99 < 100 ms):\n\n"
             "| | /health p50 | /health p99 | /health max | /predict p50 | /predict p99 | /predict max |\n"
             "|---|---|---|---|---|---|---|\n" +
             "".join(f"| {name} | " + " | ".join(f"{r[e][k]:.1f}" for e in ("health", "predict")
                                                 for k in ("p50_ms", "p99_ms", "max_ms")) + " |\n"
                     for name, r in (("alone", alone), ("beside 8 slow clients", beside_slow))) +
             "\nWhere a 1,000-record batch spends its time (this process, ms): " +
             ", ".join(f"{k} {v:.1f}" for k, v in breakdown.items()) + ".\n")
    (args.out / "serve.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
