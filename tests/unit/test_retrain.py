"""The retraining policy, the gate and the retraining queue (rareml.retrain, rareml.store): a
challenger that is better, equal, worse or unfair; too few labels; alerts queued, claimed together,
interrupted and finished."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rareml import metrics
from rareml.config import RetrainPolicy, load_config
from rareml.retrain import (
    NotEnoughLabels,
    Production,
    gate,
    group_gaps,
    production_rows,
    retraining_tables,
    weight_column,
)
from rareml.store import Store
from tests.conftest import ROOT

RNG = np.random.default_rng(0)
N = 2000
Y = (RNG.random(N) < 0.1).astype(int)
SIGNAL = Y + RNG.normal(0, 0.6, N)  # a good model's evidence
GROUPS = {"sex": np.where(RNG.random(N) < 0.5, "F", "M").astype(object)}


def probability(score: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(score * 3 - 4)))


DEFAULT = RetrainPolicy()


def judge(champion: np.ndarray, challenger: np.ndarray, policy: RetrainPolicy = DEFAULT, bound: float = 0.2,
          threshold: float = 0.3) -> dict:
    return gate(Y, champion, challenger, (champion >= threshold, challenger >= threshold), GROUPS, policy, bound,
                n_boot=300, seed=1)


def test_a_better_challenger_is_promoted_with_its_evidence():
    champion = probability(SIGNAL + RNG.normal(0, 0.8, N))  # noisier: worse
    decision = judge(champion, probability(SIGNAL))
    assert decision["promote"] and decision["reasons"] == []
    ap = decision["average_precision"]
    assert ap["difference"]["low"] > 0 and ap["difference"]["value"] == pytest.approx(
        ap["challenger"]["value"] - ap["champion"]["value"])
    assert decision["rows"] == N and decision["positives"] == int(Y.sum())
    assert set(decision["fairness"]["sex"]) == {"champion", "challenger"}


def test_an_equal_challenger_is_not_promoted():
    same = probability(SIGNAL)
    decision = judge(same, same.copy())
    assert not decision["promote"] and any("not better" in r for r in decision["reasons"])


def test_a_worse_challenger_is_rejected_and_the_margin_is_a_tolerance_not_a_pass():
    champion, worse = probability(SIGNAL), probability(SIGNAL + RNG.normal(0, 0.8, N))
    decision = judge(champion, worse)
    assert not decision["promote"] and decision["average_precision"]["difference"]["high"] < 0
    # a slightly better challenger, within the noise: refused at margin 0, accepted with a tolerance
    noisy = probability(SIGNAL + RNG.normal(0, 0.5, N))
    slightly = noisy + 0.01 * Y + np.random.default_rng(0).normal(0, 0.03, N)  # a little signal, more noise
    close, loose = judge(noisy, slightly), judge(noisy, slightly, RetrainPolicy(margin=0.5))
    difference = close["average_precision"]["difference"]
    assert difference["low"] <= 0 < difference["value"]
    assert not close["promote"] and any("lower bound" in r for r in close["reasons"])
    assert loose["promote"]


def test_a_worse_calibrated_challenger_fails_on_brier():
    good = probability(SIGNAL)
    overconfident = np.clip(good * 4, 0, 1)  # same ranking, so the same AP, far worse probabilities
    better_ranked = np.clip(probability(SIGNAL + 0.3 * Y) * 4, 0, 1)
    decision = judge(good, better_ranked)
    assert any("Brier score worse" in r for r in decision["reasons"]) and not decision["promote"]
    assert judge(good, overconfident, RetrainPolicy(brier_tolerance=1.0))["reasons"][0].startswith("average precision")


def test_an_unfair_challenger_is_rejected_unless_the_champion_is_as_unfair():
    champion = probability(SIGNAL + RNG.normal(0, 0.8, N))
    unfair = probability(SIGNAL) + np.where(GROUPS["sex"] == "F", 0.5, 0.0)  # far more women selected
    decision = judge(champion, np.clip(unfair, 0, 1))
    assert not decision["promote"]
    assert any(r.startswith("sex: selection rate gap") for r in decision["reasons"])
    as_unfair = judge(np.clip(unfair, 0, 1), np.clip(unfair, 0, 1))  # the champion's gap is as wide
    assert not any(r.startswith("sex:") for r in as_unfair["reasons"])


def selecting(rates: dict[str, tuple[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of groups {name: (rows, share selected)}, a third of them positive, as y, decision, groups."""
    groups = np.concatenate([[g] * n for g, (n, _) in rates.items()]).astype(object)
    decision = np.concatenate([np.arange(n) < round(n * share) for n, share in rates.values()])
    y = (np.arange(len(groups)) % 3 == 0).astype(int)
    return y, decision, groups


def test_group_gaps_are_the_monitorings_rates_with_a_bootstrap_interval():
    y, decision, groups = selecting({"a": (600, 0.4), "b": (60, 0.6), "tiny": (5, 1.0)})
    gaps = group_gaps(y, decision, groups, n_boot=400, seed=0)
    rates = metrics.group_rates(y, decision, groups)
    judged = [r["selection_rate"] for g, r in rates.items() if r["n"] >= 20]  # "tiny" is too small to judge
    assert gaps["selection_rate"]["value"] == pytest.approx(max(judged) - min(judged)) == pytest.approx(0.2)
    assert gaps["selection_rate"]["low"] < 0.2 < gaps["selection_rate"]["high"]
    assert group_gaps(y, decision, np.array(["a"] * len(y), dtype=object))["selection_rate"]["value"] is None


def test_only_a_gap_the_gate_set_is_sure_of_blocks_a_promotion():
    """The same point gap (0.27, above the bound 0.2): noise in a group of 24, evidence in one of 400."""
    for small, blocked in ((24, False), (400, True)):
        y, decision, groups = selecting({"a": (600, 0.4), "b": (small, 2 / 3)})
        champion = np.where(y == 1, 0.6, 0.2) + 0.01 * np.arange(len(y)) / len(y)
        challenger = np.where(y == 1, 0.9, 0.1)
        fair = np.full(len(y), True) & (np.arange(len(y)) % 2 == 0)  # the champion: the same rate everywhere
        decision_ = gate(y, champion, challenger, (fair, decision), {"g": groups}, DEFAULT, 0.2, n_boot=400, seed=0)
        gap = decision_["fairness"]["g"]["challenger"]["selection_rate"]
        assert gap["value"] == pytest.approx(2 / 3 - 0.4, abs=0.002)
        assert any(r.startswith("g: selection rate gap") for r in decision_["reasons"]) == blocked, gap


def labelled(n: int, positives_every: int = 5, with_record: bool = True) -> list[dict]:
    return [{"prediction_id": f"{i:016x}-0", "ts": 1000.0 + i, "label": int(i % positives_every == 0),
             "model_version": "v1", "probability": 0.5, "record": {"x": i} if with_record else None}
            for i in range(n)]


def test_the_policy_holds_out_the_newest_rows_as_the_gate_set():
    rows = labelled(300)[::-1]  # in any order: by time
    got = production_rows(rows, RetrainPolicy(min_new_labels=100, gate_share=0.3, min_gate_positives=5), now=2000)
    assert [r["ts"] for r in got.train] == [1000.0 + i for i in range(210)]
    assert [r["ts"] for r in got.gate] == [1000.0 + i for i in range(210, 300)]
    assert got.skipped == 0


def test_the_policy_says_what_is_short():
    policy = RetrainPolicy(min_new_labels=100, min_gate_positives=5)
    with pytest.raises(NotEnoughLabels, match="^90 labelled production rows, fewer than min_new_labels = 100 "
                                              r"\(20 more have no record as sent\)$"):
        production_rows(labelled(90) + labelled(20, with_record=False), policy, now=2000)
    with pytest.raises(NotEnoughLabels, match="holds 3 positives"):
        production_rows(labelled(100, positives_every=10), policy, now=2000)
    recent = RetrainPolicy(min_new_labels=100, window_days=1.0)
    with pytest.raises(NotEnoughLabels, match="in the last 1 days"):
        production_rows(labelled(300), recent, now=1000.0 + 86400 + 250)  # only the newest 50 are in the window


def test_the_queue_runs_several_alerts_as_one_retraining_and_survives_a_restart(tmp_path):
    store = Store(tmp_path / "log.db", 1)
    fire = [{"status": "firing", "labels": {"alertname": n, "retrain": "true"}, "fingerprint": n, "startsAt": "t0"}
            for n in ("A", "B")]
    assert store.add_alerts(fire + [fire[0] | {"status": "resolved"}]) == 2
    assert store.retrain_outcomes() == {"queued": 2}
    claimed = store.claim_retrain()
    assert [c["alertname"] for c in claimed] == ["A", "B"] and store.retrain_outcomes() == {"running": 2}
    # the watcher stopped mid-way: the next one takes them again, once more, then gives up
    assert store.claim_retrain() == claimed
    assert store.claim_retrain() == []
    assert store.retrain_outcomes() == {"failed": 2}
    assert store.add_alerts([fire[0] | {"startsAt": "t1"}]) == 1
    (again,) = store.claim_retrain()
    assert again["alert"] == "A@t1"
    store.finish_retrain([again["id"]], "promoted", {"challenger": "abc"})
    newest = store.retrains()[0]
    assert newest["outcome"] == "promoted" and newest["detail"] == {"challenger": "abc"} and newest["attempts"] == 1
    assert store.last_retrain_finished() == newest["finished"]
    assert store.retrain_outcomes() == {"failed": 2, "promoted": 1}


def test_the_retraining_table_keeps_the_configs_weights_and_weighs_production_rows(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "t"\ndata = "d.csv"\ntarget = "y"\npositive = "yes"\nweight = "w"\n'
                    'categorical = ["code"]\n[retrain]\nproduction_weight = 3.0\n')
    config = load_config(path)
    original = pd.DataFrame({"x": [1.5, 2.0], "code": [1, 2], "w": [1.0, 3.0], "y": ["no", "yes"]})
    rows = [{"ts": 1.0 + i, "label": i % 2, "record": {"x": 5, "code": "new", "w": 9, "sent_extra": 1}}
            for i in range(3)]
    table, gate_table = retraining_tables(config, original, Production(rows[:2], rows[2:], 0))
    assert weight_column(config) == "w"  # the user's weights stay weights, never a feature
    assert list(table.columns) == list(gate_table.columns) == ["x", "code", "y", "w"]
    assert table["w"].tolist() == [1.0, 3.0, 6.0, 6.0] and gate_table["w"].tolist() == [1.0]
    assert table["y"].tolist() == ["no", "yes", "no", "yes"] and gate_table["y"].tolist() == ["no"]
    assert table["code"].tolist() == ["1", "2", "new", "new"] and table["x"].tolist() == [1.5, 2.0, 5.0, 5.0]


def test_the_promote_step_refuses_a_verdict_against_a_champion_that_has_changed_since_the_snapshot(tmp_path):
    """Airflow runs the steps apart: someone may promote by hand between the snapshot and the end."""
    import importlib
    import json
    import os

    stage = importlib.import_module("06_retrain")
    root, run_dir = tmp_path / "artifacts", tmp_path / "artifacts" / "runs" / "20261201T100000Z"
    run_dir.mkdir(parents=True)
    (root / "gates").mkdir()
    old, challenger, by_hand = "a" * 12, "b" * 12, "c" * 12
    os.symlink(f"models/{by_hand}", root / "champion")  # moved after the snapshot
    (run_dir / "run.json").write_text(json.dumps({"started": 0.0, "champion": old, "alert": None}))
    ap = {"value": 0.5, "low": 0.4, "high": 0.6}
    (run_dir / "gate.json").write_text(json.dumps({"promote": True, "reasons": [], "champion": old,
                                                   "challenger": challenger, "average_precision": {
                                                       "champion": ap, "challenger": ap, "difference": ap}}))
    outcome = stage.promote(load_config(ROOT / "configs" / "credit_data.toml"), root, run_dir, use_mlflow=False)
    assert outcome["outcome"] == "rejected" and "champion changed" in outcome["reasons"][0]
    assert os.readlink(root / "champion") == f"models/{by_hand}"  # untouched
    assert json.loads((run_dir / "gate.json").read_text())["promote"] is False
    assert json.loads((root / "gates" / f"{challenger}.json").read_text())["reasons"] == outcome["reasons"]
