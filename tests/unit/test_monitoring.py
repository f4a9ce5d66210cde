"""The windowed signals (rareml.monitoring): PSI, data drift against a training reference, live
precision/recall/AP from delayed labels, and fairness gaps between groups."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rareml import monitoring
from rareml.data import numeric_reference, reference_stats
from rareml.features import CATEGORICAL, NUMERIC, UNSEEN, Feature, RecordEncoder, Schema, to_records
from rareml.monitoring import MIN_GROUP, MIN_GROUP_POSITIVES, categorical_shares, feature_drift, psi
from rareml.store import Labeled, Window

LEVELS = {"a": 0.5, "b": 0.3, "c": 0.145, "d": 0.05, "r": 0.005}  # r: rarer than RARE_LEVEL
SCHEMA = Schema(features=(Feature("x", NUMERIC), Feature("c", CATEGORICAL, categories=tuple(sorted(LEVELS))),
                          Feature("n", NUMERIC)), target="y", positive=1)


def sample(n: int, seed: int, shift: float = 0.0, levels: dict | None = None, missing: float = 0.05) -> pd.DataFrame:
    """Training-like data: x ~ N(50, 10) with some missing, c with the given level shares, n integer-valued."""
    rng = np.random.default_rng(seed)
    levels = levels or LEVELS
    x = rng.normal(50, 10, n) + shift
    x[rng.random(n) < missing] = np.nan
    c = rng.choice(list(levels), n, p=np.array(list(levels.values())) / sum(levels.values())).astype(object)
    c[rng.random(n) < 0.02] = np.nan
    return pd.DataFrame({"x": x, "c": c, "n": rng.poisson(3, n).astype(float)})


@pytest.fixture(scope="module")
def reference() -> dict:
    return reference_stats(sample(20_000, 0), SCHEMA)


def encode(frame: pd.DataFrame) -> np.ndarray:
    return RecordEncoder(SCHEMA).encode_many(to_records(frame, SCHEMA))[0]


# -- PSI ------------------------------------------------------------------------------------------

def test_psi_by_hand():
    assert psi(np.array([0.5, 0.5]), np.array([0.25, 0.75])) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))


def test_psi_is_zero_for_identical_shares_and_ignores_bins_empty_on_both_sides():
    shares = np.array([0.2, 0.0, 0.5, 0.3, 0.0])
    assert psi(shares, shares) == 0.0
    assert psi(np.array([0.5, 0.5, 0.0]), np.array([0.5, 0.5, 0.0])) == 0.0


def test_psi_stays_finite_with_empty_bins():
    value = psi(np.array([0.5, 0.5, 0.0]), np.array([0.4, 0.0, 0.6]))
    assert math.isfinite(value) and value > 1
    assert math.isfinite(psi(np.array([1.0, 0.0]), np.array([0.0, 1.0])))


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 12).flatmap(lambda k: st.tuples(*[st.lists(st.floats(0, 1), min_size=k, max_size=k)] * 2)))
def test_psi_is_non_negative_symmetric_and_zero_only_for_equal_shares(pair):
    e, a = (np.array(v) for v in pair)
    value = psi(e, a)
    assert math.isfinite(value) and value >= 0
    assert value == pytest.approx(psi(a, e), rel=1e-12, abs=1e-15)
    floor = monitoring.MIN_SHARE  # shares below the floor count as the floor
    if np.any(np.abs(np.maximum(e, floor) - np.maximum(a, floor)) > 1e-6):
        assert value > 0
    else:
        assert value < 1e-9


# -- data drift -----------------------------------------------------------------------------------

def test_window_drawn_from_the_training_distribution_shows_no_drift(reference):
    drift = feature_drift(SCHEMA, reference, encode(sample(2000, 1)))
    assert set(drift) == {"x", "c", "n"}
    assert max(drift.values()) < 0.05, drift


def test_the_training_values_themselves_have_zero_drift():
    """numeric_reference and the window's binning agree on ties at the edges: (e[i-1], e[i]]."""
    values = np.random.default_rng(0).poisson(3, 5000).astype(float)  # many values sit on an edge
    values[:100] = np.nan
    ref = numeric_reference(values)
    assert psi(*monitoring.numeric_shares(ref, values)) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize(("changed", "frame"), [
    ("x", lambda: sample(2000, 1, shift=25)),
    ("x", lambda: sample(2000, 1, missing=0.5)),
    ("c", lambda: sample(2000, 1, levels={"a": 0.15, "b": 0.6, "c": 0.2, "d": 0.05})),
])
def test_a_shifted_feature_drifts_and_only_that_one(reference, changed, frame):
    drift = feature_drift(SCHEMA, reference, encode(frame()))
    assert drift[changed] > 0.2, drift
    assert all(v < 0.05 for k, v in drift.items() if k != changed), drift


def test_unseen_and_rare_levels_share_the_other_bin_and_missing_has_its_own():
    reference = {"kind": CATEGORICAL, "shares": {"a": 0.5, "b": 0.3, "c": 0.145, "d": 0.045, "r": 0.005},
                 "other": 0.0, "missing": 0.005}
    codes = np.array([0.0] * 50 + [UNSEEN] * 30 + [4.0] * 10 + [np.nan] * 10)  # a, unseen, r (rare), missing
    expected, actual = categorical_shares(reference, SCHEMA.features[1].categories, codes)
    np.testing.assert_allclose(expected, [0.5, 0.3, 0.145, 0.045, 0.005, 0.005])
    np.testing.assert_allclose(actual, [0.5, 0, 0, 0, 0.4, 0.1])
    assert actual.sum() == pytest.approx(1) and expected.sum() == pytest.approx(1)


def test_unseen_levels_in_a_window_show_as_drift(reference):
    rows = encode(sample(2000, 1))
    rows[:600, 1] = UNSEEN
    assert feature_drift(SCHEMA, reference, rows)["c"] > 0.2


# -- live performance -----------------------------------------------------------------------------

def labeled(probability, decision, label, rows=None, extras=None) -> Labeled:
    n = len(label)
    return Labeled(probability=np.array(probability, float), decision=np.array(decision, int),
                   label=np.array(label, int), rows=np.zeros((n, 3)) if rows is None else rows,
                   extras=extras or [{} for _ in range(n)])


def test_live_performance_by_hand():
    lab = labeled([0.9, 0.3, 0.8, 0.1, 0.6], [1, 0, 1, 0, 1], [1, 1, 0, 0, 1])
    precision, recall, ap = monitoring.live_performance(lab)
    assert precision == pytest.approx(2 / 3) and recall == pytest.approx(2 / 3)
    assert ap == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)  # ranks 1, 3, 4 hold the positives


@pytest.mark.parametrize(("decision", "label", "expected"), [
    ([0, 0, 0], [1, 0, 1], (math.nan, 0.0, "defined")),  # no positive decision: precision undefined
    ([1, 0, 1], [0, 0, 0], (0.0, math.nan, math.nan)),  # no positive label: recall and AP undefined
    ([1, 0, 1], [1, 1, 1], (1.0, 2 / 3, math.nan)),  # only positives: AP undefined
    ([], [], (math.nan, math.nan, math.nan)),
])
def test_live_performance_is_nan_when_undefined(decision, label, expected):
    got = monitoring.live_performance(labeled([0.9, 0.2, 0.7][:len(label)], decision, label))
    for value, want in zip(got, expected):
        if want == "defined":
            assert math.isfinite(value)
        elif math.isnan(want):
            assert math.isnan(value)
        else:
            assert value == pytest.approx(want)


# -- fairness -------------------------------------------------------------------------------------

FAIR = Schema(features=(Feature("x", NUMERIC), Feature("race", CATEGORICAL, categories=("A", "B", "C"))),
              target="y", positive=1, sensitive=("race", "sex"))  # race: a feature; sex: recorded beside it


def fairness_window() -> Window:
    race = [0.0] * 30 + [1.0] * 25 + [2.0] * 5 + [UNSEEN] * 10 + [np.nan] * 10
    decision = [1] * 15 + [0] * 15 + [1] * 5 + [0] * 20 + [1] * 5 + [1] * 10 + [1] * 10
    sex = ["F"] * 40 + ["M"] * 25 + [None] * 15
    rows = np.column_stack([np.arange(80.0), race])
    return Window(probability=np.full(80, 0.5), decision=np.array(decision), rows=rows, extras=[{"sex": s} for s in sex])


def fairness_labeled() -> Labeled:
    """Positives: A 12 (9 found), B 10 (5 found), C 9 (too few to count, none found); negatives all flagged."""
    race = [0.0] * 12 + [1.0] * 10 + [2.0] * 9 + [0.0] * 20
    decision = [1] * 9 + [0] * 3 + [1] * 5 + [0] * 5 + [0] * 9 + [1] * 20
    label = [1] * 31 + [0] * 20
    sex = ["F"] * 11 + ["M"] * 10 + ["F"] * 10 + ["M"] * 20  # F: 21 positives, 9 found; M: 10, 5 found
    return labeled(np.full(51, 0.5), decision, label, np.column_stack([np.zeros(51), race]), [{"sex": s} for s in sex])


def test_group_values_decode_features_and_extras():
    window = fairness_window()
    race = monitoring.group_values(FAIR, window.rows, window.extras, "race")
    assert race[0] == "A" and race[30] == "B" and race[55] == "C" and race[60] == "nan" and race[75] == "nan"
    sex = monitoring.group_values(FAIR, window.rows, window.extras, "sex")
    assert sex[0] == "F" and sex[40] == "M" and sex[70] == "nan"
    numbers = monitoring.group_values(FAIR, window.rows[:3], [{"sex": 1}, {"sex": 2.0}, {}], "sex")
    assert numbers.tolist() == ["1", "2", "nan"]


def test_fairness_gaps_over_groups_large_enough_to_judge():
    rates, selection_gap, tpr_gap = monitoring.fairness(FAIR, fairness_window(), fairness_labeled())
    assert rates["race"] == pytest.approx({"A": 0.5, "B": 0.2})  # C (5 < MIN_GROUP), unseen and missing left out
    assert selection_gap["race"] == pytest.approx(0.3)
    assert rates["sex"] == pytest.approx({"F": 0.5, "M": 0.4})  # from the extras; missing left out
    assert selection_gap["sex"] == pytest.approx(0.1)
    assert tpr_gap["race"] == pytest.approx(9 / 12 - 5 / 10)  # C: 9 < MIN_GROUP_POSITIVES positives, left out
    assert tpr_gap["sex"] == pytest.approx(5 / 10 - 9 / 21)
    assert MIN_GROUP == 20 and MIN_GROUP_POSITIVES == 10  # the construction above relies on these


def test_fairness_gap_is_nan_with_fewer_than_two_judgeable_groups():
    window = fairness_window()
    small = Window(probability=window.probability[:35], decision=window.decision[:35], rows=window.rows[:35],
                   extras=window.extras[:35])
    rates, selection_gap, tpr_gap = monitoring.fairness(FAIR, small, labeled([], [], [], np.zeros((0, 2)), []))
    assert rates["race"] == {"A": 0.5} and math.isnan(selection_gap["race"])
    assert math.isnan(tpr_gap["race"]) and math.isnan(tpr_gap["sex"])


# -- all signals ----------------------------------------------------------------------------------

def test_signals_of_an_empty_log_are_empty_not_an_error(reference):
    empty = Window(probability=np.zeros(0), decision=np.zeros(0, int), rows=np.zeros((0, 3)), extras=[])
    s = monitoring.signals(SCHEMA, reference | {"__score__": numeric_reference(np.linspace(0, 1, 100))}, empty,
                           labeled([], [], [], np.zeros((0, 3)), []))
    assert s.predictions == 0 and s.labeled == 0 and s.feature_psi == {}
    assert all(math.isnan(v) for v in (s.positive_rate, s.score_psi, s.precision, s.recall, s.average_precision))


def test_signals_combine_the_parts(reference):
    rows = encode(sample(500, 3))
    rng = np.random.default_rng(0)
    probability = rng.random(500)
    window = Window(probability=probability, decision=(probability > 0.7).astype(int), rows=rows,
                    extras=[{} for _ in range(500)])
    lab = labeled(probability[:100], window.decision[:100], (rng.random(100) < probability[:100]).astype(int),
                  rows[:100])
    score_ref = numeric_reference(rng.random(5000))
    s = monitoring.signals(SCHEMA, reference | {"__score__": score_ref}, window, lab)
    assert s.predictions == 500 and s.labeled == 100
    assert s.positive_rate == pytest.approx(window.decision.mean())
    assert s.feature_psi == feature_drift(SCHEMA, reference, rows)
    assert s.score_psi < 0.1  # uniform scores against a uniform reference
    assert (s.precision, s.recall, s.average_precision) == monitoring.live_performance(lab)
