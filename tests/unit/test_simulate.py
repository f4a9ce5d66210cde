"""05_simulate's scenarios and its replay: which rows, which labels, and a stop that still sends
every label already due (the loop test and benchmark stop it with SIGTERM)."""
from __future__ import annotations

import importlib
import threading
import time

import numpy as np
import pandas as pd
import pytest

from rareml.data import LABEL
from rareml.errors import RareMLError
from rareml.features import CATEGORICAL, NUMERIC, Feature, Schema

simulate = importlib.import_module("05_simulate")
SCHEMA = Schema(features=(Feature("age", NUMERIC), Feature("job", CATEGORICAL, categories=("a", "b"))), target="y",
                positive=1)


def rows(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"age": rng.integers(18, 90, n).astype(float), "job": rng.choice(["a", "b"], n),
                         LABEL: (rng.random(n) < 0.1).astype(int)})


def test_concept_flips_the_label_above_the_median_only_and_moves_no_input():
    source = rows()
    got = simulate.scenario_rows("concept", source, SCHEMA, ["age"], 2.0, 0.3, seed=0).sort_index()
    above = source["age"] > source["age"].median()
    assert got[["age", "job"]].equals(source[["age", "job"]])
    assert (got.loc[above, LABEL] == 1 - source.loc[above, LABEL]).all()
    assert (got.loc[~above, LABEL] == source.loc[~above, LABEL]).all()
    with pytest.raises(RareMLError, match="needs a numeric feature first"):
        simulate.scenario_rows("concept", source, SCHEMA, ["job"], 2.0, 0.3, seed=0)


def test_none_and_real_replay_the_source_as_it_is_shuffled():
    source = rows()
    for scenario in ("none", "real"):
        got = simulate.scenario_rows(scenario, source, SCHEMA, ["age"], 2.0, 0.3, seed=3)
        assert not got.index.equals(source.index) and got.sort_index().equals(source)


class Recording:
    """The API's side of the replay: answers every POST 200 and keeps what it got."""

    def __init__(self):
        self.lock, self.got, self.n = threading.Lock(), [], 0

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.got.append((path, body))
            self.n += 1
            return 200, {"prediction_id": f"p{self.n}"} if path == "/predict" else {}


def test_a_stopped_replay_sends_no_more_predictions_but_every_label_due():
    client, stop = Recording(), threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    summary = simulate.replay(client, [{"age": 30}] * 10, [1] * 10, rate=20, seconds=60, delay=0.3,
                              feedback_share=1.0, concurrency=2, seed=0, stop=stop)
    assert time.monotonic() - started < 5
    predicted = [b for p, b in client.got if p == "/predict"]
    assert 5 <= len(predicted) <= 15 and summary["sent"] == len(predicted) == summary["predict 200"]
    assert summary["feedback 200"] == len(predicted)  # each answered prediction got its label
