import numpy as np
import pytest
from sklearn import metrics as skm

from rareml import metrics
from rareml.config import ThresholdPolicy


@pytest.fixture
def scores():
    rng = np.random.default_rng(1)
    y = (rng.random(3000) < 0.07).astype(int)
    s = np.clip(rng.normal(0.2 + 0.3 * y, 0.15), 0, 1).round(2)  # rounding makes ties
    return y, s


def test_ranking_metrics_equal_scikit_learn_with_ties_and_weights(scores):
    y, s = scores
    w = np.random.default_rng(2).integers(0, 3, len(y)).astype(float)
    assert metrics.average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert metrics.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert metrics.average_precision(y, s, w) == pytest.approx(skm.average_precision_score(y, s, sample_weight=w))
    assert metrics.roc_auc(y, s, w) == pytest.approx(skm.roc_auc_score(y, s, sample_weight=w))


def test_probability_metrics_equal_scikit_learn(scores):
    y, s = scores
    p = np.clip(s, 0.01, 0.99)
    assert metrics.brier(y, p) == pytest.approx(skm.brier_score_loss(y, p))
    assert metrics.log_loss(y, p) == pytest.approx(skm.log_loss(y, p))


def test_ece_small_for_calibrated_scores_and_large_for_inflated_ones():
    rng = np.random.default_rng(3)
    p = rng.beta(0.5, 6, 50_000)
    y = (rng.random(len(p)) < p).astype(int)
    assert metrics.ece(y, p) < 0.01
    assert metrics.ece(y, np.minimum(p * 3, 1)) > 0.1


def brute_force(y, s, score):
    return max(np.unique(s), key=lambda t: (score(y, s >= t), t))


@pytest.mark.parametrize("policy, score", [
    (ThresholdPolicy("f1"), lambda y, d: skm.f1_score(y, d, zero_division=0)),
    (ThresholdPolicy("fbeta", beta=2.0), lambda y, d: skm.fbeta_score(y, d, beta=2.0, zero_division=0)),
    (ThresholdPolicy("mcc"), lambda y, d: skm.matthews_corrcoef(y, d)),
    (ThresholdPolicy("cost", cost_fp=1.0, cost_fn=8.0),
     lambda y, d: -(np.sum(d & (y == 0)) + 8 * np.sum(~d & (y == 1)))),
])
def test_threshold_choice_matches_brute_force(scores, policy, score):
    y, s = scores
    choice = metrics.choose_threshold(y, s, policy)
    best = brute_force(y, s, score)
    assert score(y, s >= choice.threshold) == pytest.approx(score(y, s >= best))


def test_precision_floor_gives_the_best_recall_that_meets_it(scores):
    y, s = scores
    choice = metrics.choose_threshold(y, s, ThresholdPolicy("min_precision", min_precision=0.5))
    at = metrics.at_threshold(y, s, choice.threshold)
    assert choice.met and at["precision"] >= 0.5
    better = [t for t in np.unique(s) if metrics.at_threshold(y, s, t)["recall"] > at["recall"]]
    assert all(metrics.at_threshold(y, s, t)["precision"] < 0.5 for t in better)


def test_recall_floor_and_an_unreachable_floor(scores):
    y, s = scores
    choice = metrics.choose_threshold(y, s, ThresholdPolicy("min_recall", min_recall=0.9))
    assert choice.met and metrics.at_threshold(y, s, choice.threshold)["recall"] >= 0.9
    y2 = np.r_[np.zeros(50), np.ones(50)].astype(int)
    s2 = np.full(100, 0.5)
    impossible = metrics.choose_threshold(y2, s2, ThresholdPolicy("min_precision", min_precision=0.9))
    assert not impossible.met


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_data():
    rng = np.random.default_rng(4)

    def width(n):
        y = (rng.random(n) < 0.1).astype(int)
        p = np.clip(0.1 + 0.4 * y + rng.normal(0, 0.2, n), 0, 1)
        est = metrics.evaluate(y, p, threshold=0.4, n_boot=200, seed=0)["average_precision"]
        assert est.low <= est.value <= est.high
        assert est.value == pytest.approx(skm.average_precision_score(y, p))
        return est.high - est.low

    assert width(20_000) < width(1_000)


def test_no_skill_baseline():
    y = np.r_[np.ones(10), np.zeros(90)]
    base = metrics.no_skill(y)
    assert base["average_precision"] == 0.1 and base["roc_auc"] == 0.5
    assert base["brier"] == pytest.approx(skm.brier_score_loss(y, np.full(100, 0.1)))


def test_group_rates():
    y = np.array([1, 1, 0, 0, 1, 0])
    decision = np.array([True, False, True, False, True, False])
    groups = np.array(["a", "a", "a", "b", "b", "b"], dtype=object)
    rates = metrics.group_rates(y, decision, groups)
    assert rates["a"] == {"n": 3, "selection_rate": pytest.approx(2 / 3), "true_positive_rate": 0.5}
    assert rates["b"]["true_positive_rate"] == 1.0
