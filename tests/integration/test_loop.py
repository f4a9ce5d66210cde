"""The closed loop end to end, every part real: a model trained on the census 1994 rows serves
under gunicorn (2 workers), Prometheus scrapes it and evaluates the shipped rules, Alertmanager
posts to its webhook, the watcher retrains, and 05_simulate.py replays the 1995 rows with a concept
drift and sends their labels. A probe client keeps asking /predict throughout. Driven by the same
`Loop` as benchmarks/loop.py; every process stopped by PID, also on failure."""
from __future__ import annotations

import json
import math
import sys
import time

import pytest

from rareml import registry
from tests.conftest import ROOT
from tests.integration.test_monitoring import require_binaries
from tests.integration.test_retrain import config_with

pytestmark = [pytest.mark.integration, pytest.mark.slow]
sys.path.insert(0, str(ROOT / "benchmarks"))
loop_module = pytest.importorskip("loop")
POLICY = "min_new_labels = 300\nproduction_weight = 5.0\n"
BUDGET, BOOTSTRAP, RATE = 40, 300, 10  # RATE: the 3,000 held-out rows last 5 minutes, never sent twice


def test_concept_drift_is_caught_retrained_on_promoted_and_swapped_in_with_no_failed_request(
        trained, census_small, tmp_path):
    require_binaries()
    config = config_with(census_small, tmp_path, POLICY)
    with loop_module.Loop(trained / "artifacts", tmp_path / "work", config, budget=BUDGET, bootstrap=BOOTSTRAP,
                          rate=RATE) as loop:
        figures = loop_module.closed_loop(loop, warmup=0, after_labels=200, limit=900)
        card = loop.get(f"{loop.url}/model")
        alerts = loop.get(f"{loop.url}/alerts")
    old, new = figures["champion"], figures["challenger"]
    assert figures["outcome"] == "promoted", json.dumps(figures["retraining"], indent=1)
    assert new != old and registry.version_of(loop.root, "champion") == new
    assert registry.version_of(loop.root, "previous") == old
    # the alert fired in Prometheus, reached the webhook and caused the retraining
    (tmp_path / "figures.json").write_text(json.dumps(figures, indent=1, default=str))  # to read on failure
    assert any(a["alertname"] == loop_module.DECAY for a in figures["alerts_fired"])
    assert any(a["alertname"] == loop_module.DECAY and a["status"] == "firing" and a["labels"]["retrain"] == "true"
               for a in alerts["alerts"])
    assert figures["gate"]["promote"] and loop_module.DECAY in figures["gate"]["alert"]["alertname"]
    assert card["model_version"] == new and card["gate"] == figures["gate"] and card["lineage"]["parent"] == old
    # zero failed requests, from the probe and the simulator, through the swap; both workers swapped
    probe, sim = figures["probe"], figures["simulation"]
    assert probe["failed"] == 0 and probe["answers"] > 1000, probe["statuses"]
    assert sim["predict 200"] == sim["feedback 200"] == sim["sent"], sim
    assert figures["reloads"] == {"ok": 2, "refused": 0}
    assert probe["versions_after_swap"] == [new] and probe["last_old_answer"] >= probe["first_new_answer"] - 0.1
    # live performance on the new traffic: fell under the drift, recovers with the new champion
    during, after = figures["live"]["during"], figures["live"]["after"]
    assert during["versions"] == [old] and after["versions"] == [new] and after["rareml_window_labeled"] >= 200
    assert after["average_precision"] > during["average_precision"] + 0.1, figures["live"]
    assert after["recall"] > 2 * during["recall"], figures["live"]


def test_a_challenger_trained_on_a_drift_that_has_passed_is_rejected_and_nothing_changes(
        trained, census_small, tmp_path):
    """The drift fires the alert, then ends before the watcher runs: the challenger learnt the
    drifted labels, the gate set (the newest labels) is as in training again, so it is worse there."""
    require_binaries()
    config = config_with(census_small, tmp_path, POLICY)
    with loop_module.Loop(trained / "artifacts", tmp_path / "work", config, budget=BUDGET, bootstrap=BOOTSTRAP,
                          rate=RATE, mlflow=False) as loop:
        champion = registry.version_of(loop.root, "champion")
        probe = loop.start_probe()
        drift = loop.simulate("concept", 900)
        loop.wait_for("a retraining queued by the alert", loop.retrains, 300)
        drifted = loop.finish_simulation(drift)["feedback 200"]
        # enough rows after the drift that the gate set (the newest 30% of all labels) holds only them
        seconds = math.ceil(drifted * 0.3 / 0.7 / RATE) + 10
        passed = loop.finish_simulation(loop.simulate("real", seconds, "--seed", "1"), stop=False, seconds=seconds + 120)
        loop.start_watcher()
        done = loop.wait_for("the retraining's outcome", lambda: loop.retrains(finished=True), BUDGET + 600)
        time.sleep(5)  # longer than a worker's look at the alias (2 s)
        answers = probe.stop()
        reloads = loop.metric("rareml_model_reloads_total", 0.0)
        card = loop.get(f"{loop.url}/model")
    outcome = done[0]["detail"]
    assert done[0]["outcome"] == "rejected", outcome
    assert any("average precision not better" in r for r in outcome["reasons"]), outcome
    assert outcome["average_precision"]["difference"]["value"] < 0
    assert registry.version_of(loop.root, "champion") == champion and registry.version_of(loop.root, "previous") is None
    assert registry.version_of(loop.root, "challenger") == outcome["challenger"] != champion
    gate = json.loads((loop.root / registry.GATES / f"{outcome['challenger']}.json").read_text())
    assert not gate["promote"] and gate["rows"] <= passed["feedback 200"]  # judged on the rows after the drift
    assert reloads == 0 and card["model_version"] == champion
    assert answers and {a[1] for a in answers} == {200} and {a[2] for a in answers} == {champion}
