"""Stage 5: traffic and drift simulator. Replays real rows to a running API at a given rate for a
bounded time, and sends each true label back to /feedback after a delay, as production would.

Scenarios (the rows come from ARTIFACTS, written by `make prepare`: the training split, or with
--source test the held-out test split, which for the census default is 1995 after training on 1994):
  none       the rows as they are (training rows: the reference distribution itself, no drift)
  real       the held-out test split as it is (the same as --scenario none --source test)
  covariate  the rows with --features shifted (numbers by --shift standard deviations;
             categories moved to a rare level in half the rows): data drift
  label      the rows resampled so the positive rate is --positive-rate: prior shift
  concept    the rows with their label flipped where --features[0] is above its median: the
             inputs do not move, their relation to the label does, and only live performance shows it
It talks only to --url. SIGTERM or Ctrl-C stops the sending; the labels already due are still sent
and the summary printed. Usage: make simulate URL=http://127.0.0.1:8000 SCENARIO=covariate
"""
from __future__ import annotations

import argparse
import heapq
import http.client
import json
import logging
import signal
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from rareml.artifacts import Layout, read_json
from rareml.cli import require, run
from rareml.data import LABEL
from rareml.errors import RareMLError
from rareml.features import CATEGORICAL, Schema, to_records

log = logging.getLogger("05_simulate")
SCENARIOS = ("none", "real", "covariate", "label", "concept")


def default_features(schema: Schema, importance: dict[str, float], n: int = 2) -> list[str]:
    """The most important numeric features: the ones whose drift matters."""
    numeric = [f.name for f in schema.features if f.kind != CATEGORICAL]
    return sorted(numeric, key=lambda name: -importance.get(name, 0.0))[:n]


def scenario_rows(scenario: str, source: pd.DataFrame, schema: Schema, features: list[str], shift: float,
                  positive_rate: float, seed: int) -> pd.DataFrame:
    """The rows to replay, in order, with their (possibly changed) labels in LABEL."""
    rng = np.random.default_rng(seed)
    rows = source.sample(frac=1.0, random_state=seed).copy()
    if scenario in ("none", "real"):
        return rows
    kinds = {f.name: f for f in schema.features}
    unknown = [f for f in features if f not in kinds]
    if unknown:
        raise RareMLError(f"--features: {', '.join(unknown)} not among the model's features")
    if scenario == "covariate":
        for name in features:
            f = kinds[name]
            if f.kind == CATEGORICAL:
                counts = rows[name].value_counts()
                rare = counts.index[-1] if len(counts) else None
                rows.loc[rng.random(len(rows)) < 0.5, name] = rare
            else:
                rows[name] = rows[name] + shift * float(rows[name].std() or 1.0)
    elif scenario == "label":
        pos, neg = rows[rows[LABEL] == 1], rows[rows[LABEL] == 0]
        n = min(len(rows), int(len(pos) / positive_rate)) if positive_rate > 0 else len(neg)
        n_pos = min(len(pos), round(n * positive_rate))
        rows = pd.concat([pos.sample(n_pos, random_state=seed, replace=n_pos > len(pos)),
                          neg.sample(n - n_pos, random_state=seed, replace=n - n_pos > len(neg))])
        rows = rows.sample(frac=1.0, random_state=seed)
    elif scenario == "concept":
        name = features[0]
        values = pd.to_numeric(rows[name], errors="coerce") if kinds[name].kind != CATEGORICAL else None
        if values is None:
            raise RareMLError(f"concept drift needs a numeric feature first in --features, not {name!r}")
        flip = values > values.median()
        rows.loc[flip, LABEL] = 1 - rows.loc[flip, LABEL]
    return rows


class Client:
    """POSTs JSON to the API (one connection per request: gunicorn's sync workers close them)."""

    def __init__(self, url: str, timeout: float = 10):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise RareMLError(f"--url must be http://host:port, got {url!r}")
        self.host, self.port, self.timeout = parsed.hostname, parsed.port or 80, timeout

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            return response.status, json.loads(data) if data else {}
        except (OSError, ValueError) as exc:
            return 0, {"error": str(exc)}
        finally:
            conn.close()


def replay(client: Client, records: list[dict], labels: list[int], rate: float, seconds: float, delay: float,
           feedback_share: float, concurrency: int, seed: int, stop: threading.Event | None = None) -> dict:
    """Send records at `rate` per second for `seconds` (cycling if needed), each label `delay`
    seconds after its prediction; returns counts by outcome. Setting `stop` ends the sending early
    (the labels already due are still sent)."""
    rng = np.random.default_rng(seed)
    stop = stop or threading.Event()
    statuses, lock, due = Counter(), threading.Lock(), []
    start = time.monotonic()
    total = int(rate * seconds)

    def predict(i: int) -> None:
        status, answer = client.post("/predict", records[i % len(records)])
        with lock:
            statuses[f"predict {status}"] += 1
            if status == 200 and rng.random() < feedback_share:
                heapq.heappush(due, (time.monotonic() + delay, answer["prediction_id"], labels[i % len(labels)]))

    def send_due(until: float) -> None:
        while True:
            with lock:
                if not due or due[0][0] > until:
                    return
                _, pid, label = heapq.heappop(due)
            status, _ = client.post("/feedback", {"prediction_id": pid, "label": int(label)})
            with lock:
                statuses[f"feedback {status}"] += 1

    with ThreadPoolExecutor(concurrency) as pool:
        for i in range(total):
            pause = start + i / rate - time.monotonic()
            if pause > 0 and stop.wait(pause) or stop.is_set():
                pool.shutdown(wait=True, cancel_futures=True)  # what a slow API left queued is not sent
                break
            pool.submit(predict, i)
            pool.submit(send_due, time.monotonic())
    send_due(time.monotonic())
    end = time.monotonic() + delay  # the last labels are due `delay` after the last prediction
    while due and time.monotonic() < end + 1:
        time.sleep(min(0.2, max(0.0, due[0][0] - time.monotonic())))
        send_due(time.monotonic())
    sent = sum(n for outcome, n in statuses.items() if outcome.startswith("predict"))
    return {"sent": sent, "seconds": round(time.monotonic() - start, 1), **dict(sorted(statuses.items()))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the API (make serve)")
    parser.add_argument("--artifacts", default="artifacts", type=Path, help="where make prepare wrote the splits")
    parser.add_argument("--scenario", choices=SCENARIOS, default="none")
    parser.add_argument("--source", choices=("train", "test"), default="train",
                        help="the split whose rows are replayed (scenario real: always test)")
    parser.add_argument("--rate", type=float, default=20.0, help="predictions per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to send")
    parser.add_argument("--feedback-delay", type=float, default=5.0, help="seconds before a label is sent")
    parser.add_argument("--feedback-share", type=float, default=1.0, help="share of predictions that get a label")
    parser.add_argument("--features", help="comma-separated features to shift (default: the 2 most important numbers)")
    parser.add_argument("--shift", type=float, default=2.0, help="covariate shift, in standard deviations")
    parser.add_argument("--positive-rate", type=float, default=0.3, help="label scenario: the new positive rate")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (0 < args.rate <= 10_000 and 0 < args.seconds <= 24 * 3600 and 0 <= args.feedback_share <= 1):
        raise RareMLError("--rate must be in (0, 10000], --seconds in (0, 86400], --feedback-share in [0, 1]")
    layout = Layout(args.artifacts)
    model_manifest = layout.model_dir / "manifest.json"
    manifest = read_json(require(model_manifest, "serialize"))
    schema = Schema.from_dict(manifest["schema"])
    features = args.features.split(",") if args.features else default_features(schema, manifest.get("importance", {}))
    split = layout.test if args.scenario == "real" or args.source == "test" else layout.train
    source = pd.read_parquet(require(split, "prepare"))
    rows = scenario_rows(args.scenario, source, schema, features, args.shift, args.positive_rate, args.seed)
    rows = rows.head(int(args.rate * args.seconds))  # what will be sent (cycled if fewer)
    log.info("%s: %d rows at %.0f/s for %.0f s to %s (features %s), labels after %.0f s", args.scenario, len(rows),
             args.rate, args.seconds, args.url, ",".join(features), args.feedback_delay)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # set from another thread: the handler may interrupt stop.wait()
        signal.signal(sig, lambda *_: threading.Thread(target=stop.set).start())
    summary = replay(Client(args.url), to_records(rows, schema), rows[LABEL].astype(int).tolist(), args.rate,
                     args.seconds, args.feedback_delay, args.feedback_share, args.concurrency, args.seed, stop)
    print(json.dumps({"scenario": args.scenario, "features": features, **summary}))


if __name__ == "__main__":
    run(main)
