import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from rareml import metrics
from rareml.calibration import Calibrator, fit_calibrator, select_calibrator


@pytest.fixture
def distorted():
    """Scores of a model trained with a class weight: right order, inflated probabilities."""
    rng = np.random.default_rng(0)
    p = rng.beta(0.6, 8, 20_000)
    y = (rng.random(len(p)) < p).astype(int)
    odds = 10 * p / (1 - p)
    return y, odds / (1 + odds)


@pytest.mark.parametrize("method", ["sigmoid", "isotonic"])
def test_calibration_repairs_inflated_scores(distorted, method):
    y, s = distorted
    cal = fit_calibrator(method, y, s)
    assert metrics.brier(y, cal.predict(s)) < 0.9 * metrics.brier(y, s)
    assert metrics.ece(y, cal.predict(s)) < metrics.ece(y, s) / 3


def test_selection_prefers_a_calibrator_for_inflated_scores(distorted):
    y, s = distorted
    chosen, scores = select_calibrator(y, s)
    assert chosen.method in ("sigmoid", "isotonic")
    assert scores[chosen.method]["brier"] == min(v["brier"] for v in scores.values())
    assert scores["none"]["brier"] > scores[chosen.method]["brier"]


@pytest.mark.parametrize("method", ["none", "sigmoid", "isotonic"])
def test_json_round_trip_predicts_identically(distorted, method):
    y, s = distorted
    cal = fit_calibrator(method, y, s)
    again = Calibrator.from_dict(cal.to_dict())
    assert np.array_equal(again.predict(s), cal.predict(s))


def test_isotonic_matches_scikit_learn(distorted):
    y, s = distorted
    iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(s, y)
    grid = np.linspace(-0.1, 1.1, 500)
    assert np.allclose(fit_calibrator("isotonic", y, s).predict(grid), iso.predict(grid), rtol=0, atol=2e-6)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown calibration method"):
        Calibrator.from_dict({"method": "magic", "a": 1, "b": 0, "x": [], "y": []})


@pytest.mark.parametrize("method", ["sigmoid", "isotonic"])
def test_calibration_keeps_the_ranking_so_average_precision_is_unchanged(distorted, method):
    y, s = distorted
    calibrated = fit_calibrator(method, y, s).predict(s)
    assert np.all(np.diff(calibrated[np.argsort(s)]) >= 0)
    assert len(np.unique(calibrated)) == len(np.unique(s))  # no ties created (isotonic steps are broken)
    assert metrics.average_precision(y, calibrated) == pytest.approx(metrics.average_precision(y, s), abs=1e-12)
