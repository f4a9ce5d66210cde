"""Model families behind one interface: the linear family's terms, fit and saved form; a blend of
families in one model folder, scored and explained as its weighted log-odds; greedy blend selection."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from rareml import metrics
from rareml.calibration import Calibrator
from rareml.errors import RareMLError
from rareml.families import Context, blend, family, select
from rareml.families.linear import Terms, fit_linear
from rareml.features import Feature, Schema, frame_rows, to_frame
from rareml.model import load_model, save_model

SCHEMA = Schema(features=(Feature("a", "numeric", min=-4.0, max=4.0, typical=0.0),
                          Feature("b", "numeric", min=0.0, max=10.0, typical=5.0),
                          Feature("c", "categorical", categories=("p", "q", "r"))),
                target="y", positive=1)


def table(n: int = 1500, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"a": rng.normal(size=n), "b": rng.uniform(0, 10, n), "c": rng.choice(["p", "q", "r"], n)})
    frame.loc[::9, "a"] = np.nan
    frame.loc[::13, "c"] = None
    logit = -1.5 + 1.2 * frame["a"].fillna(0) + 0.3 * (frame["b"] > 6) + (frame["c"] == "q") * 0.8
    return frame, (rng.random(n) < 1 / (1 + np.exp(-logit))).to_numpy().astype(int)


def context(y: np.ndarray) -> Context:
    return Context(schema=SCHEMA, spw_max=float((y == 0).sum() / (y == 1).sum()), seed=0, rows=len(y))


@pytest.mark.parametrize("choice", [{"C": 1.0, "l1_ratio": 0.0, "bins": 0, "class_weight": "none"},
                                    {"C": 0.3, "l1_ratio": 1.0, "bins": 8, "class_weight": "balanced"}])
def test_the_linear_scorer_is_the_fitted_logistic_regression(choice):
    """The served terms (lookups, numpy alone) give the same log-odds as scikit-learn's coefficients on
    the one-hot design, and each row's contributions add up to them."""
    from sklearn.linear_model import LogisticRegression

    frame, y = table()
    x = frame_rows(to_frame(frame, SCHEMA))
    linear = fit_linear(choice, x, y, None, SCHEMA, seed=0)
    terms = Terms(x, SCHEMA, choice["bins"])
    design = terms.design(x)
    reference = LogisticRegression(C=choice["C"], l1_ratio=choice["l1_ratio"],
                                   solver="saga" if choice["l1_ratio"] else "lbfgs", max_iter=1000 if not choice[
                                       "l1_ratio"] else 200, tol=1e-4 if not choice["l1_ratio"] else 1e-3, random_state=0,
                                   class_weight="balanced" if choice["class_weight"] == "balanced" else None)
    reference.fit(design, y)
    contributions = linear.contributions(x)
    margin = np.log(linear.raw(x) / (1 - linear.raw(x)))
    np.testing.assert_allclose(contributions.sum(axis=1), margin, atol=1e-9)
    np.testing.assert_allclose(margin, reference.decision_function(design), atol=1e-6)
    assert metrics.average_precision(y, linear.raw(x)) > 0.5  # it learned the signal
    # a level never seen, a code past the known ones and missing values score as missing, no error
    odd = np.array([[np.nan, 20.0, np.nan], [0.0, -5.0, 7.0], [1.0, 5.0, -1.0]])
    assert np.isfinite(linear.raw(odd)).all()
    assert linear.contributions(odd)[1, 2] == linear.contributions(odd)[2, 2] == linear.contributions(odd)[0, 2]


def test_bins_are_learned_on_the_rows_they_fit_and_numbers_clipped_to_their_range():
    frame, _ = table()
    x = frame_rows(to_frame(frame, SCHEMA))
    terms = Terms(x, SCHEMA, bins=8)
    assert [len(e) for e in terms.edges] == [7, 7]  # 8 quantile bins per number: 7 inner edges
    assert terms.widths() == [2, 2, 8, 8, 4]  # slopes, indicators, the two numbers' bins, 3 levels + missing
    design = terms.design(x).toarray()
    bins, levels = design[:, 4:20], design[:, 20:]
    np.testing.assert_array_equal(bins.sum(axis=1), (~np.isnan(x[:, :2])).sum(axis=1))  # one bin per number present
    np.testing.assert_array_equal(levels.sum(axis=1), np.ones(len(x)))  # one level, or the missing column
    np.testing.assert_array_equal(design[:, 2:4], np.isnan(x[:, :2]))  # the missing indicators
    assert levels[np.isnan(x[:, 2]), 3].all()
    linear = fit_linear({"C": 1.0, "l1_ratio": 0.0, "bins": 0, "class_weight": "none"}, x, table()[1], None, SCHEMA, 0)
    far = np.array([[1e9, 5.0, 0.0], [float(np.nanmax(x[:, 0])), 5.0, 0.0]])
    assert linear.raw(far)[0] == linear.raw(far)[1]  # clipped to the training range


def members_for(frame: pd.DataFrame, y: np.ndarray) -> list[dict]:
    ctx = context(y)
    linear, trees = family("linear"), family("xgboost")
    lin = linear.refit([{"choice": {"C": 1.0, "l1_ratio": 0.0, "bins": 8, "class_weight": "none"}, "iterations": None}],
                       linear.prepare(to_frame(frame, SCHEMA), y), ctx)
    choice = {"grow_policy": "depthwise", "max_depth": 3, "learning_rate": 0.1, "min_child_weight": 1.0, "subsample": 1.0,
              "colsample_bytree": 1.0, "reg_lambda": 1.0, "reg_alpha": 0.001, "scale_pos_weight": 1.0, "encoding": "native"}
    xgb_fit = trees.refit([{"choice": choice, "iterations": 40}], trees.prepare(to_frame(frame, SCHEMA), y), ctx)
    return [{"family": "linear", "weight": 0.4, "fitted": lin, "choice": {"C": 1.0}},
            {"family": "xgboost", "weight": 0.6, "fitted": xgb_fit, "choice": choice}]


MANIFEST = {"name": "toy", "trained_at": "2026-01-01T00:00:00+00:00", "threshold": {"threshold": 0.3},
            "schema": SCHEMA.to_dict(), "metrics": {}, "reference": {}}


@pytest.mark.parametrize("keep", [["linear"], ["xgboost"], ["linear", "xgboost"]])
def test_a_model_of_one_family_or_a_blend_round_trips_without_pickle(tmp_path, keep):
    frame, y = table()
    members = [m for m in members_for(frame, y) if m["family"] in keep]
    if len(members) == 1:
        members[0]["weight"] = 1.0
    calibrator = Calibrator("sigmoid", a=1.1, b=-0.1)
    written = save_model(tmp_path / "model", members, calibrator, MANIFEST)
    assert [m["family"] for m in written["members"]] == keep
    for path in (tmp_path / "model").iterdir():
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", path.name  # no pickle, no torch zip
    model = load_model(tmp_path / "model")
    rows = model.rows(frame)
    scores = [family(m["family"]).scorer(m["fitted"], SCHEMA).raw(rows) for m in members]
    expected = calibrator.predict(blend(scores, [m["weight"] for m in members]))
    np.testing.assert_array_equal(model.predict_proba(frame), expected)  # identical after save and load
    raw = model.raw_rows(rows)
    np.testing.assert_allclose(model.contributions(frame).sum(axis=1), np.log(raw / (1 - raw)), atol=1e-5)
    assert model.kind == (keep[0] if len(keep) == 1 else "blend of linear, xgboost")
    model.check()  # no saved examples: still readies the compiled trees
    # one record at a time (the API's path) and many agree
    records = frame.head(5).to_dict(orient="records")
    np.testing.assert_allclose(model.predict_proba(records), expected[:5], rtol=1e-6)


def test_a_weight_edited_in_the_manifest_is_refused(tmp_path):
    frame, y = table()
    save_model(tmp_path / "model", members_for(frame, y), Calibrator(), MANIFEST)
    path = tmp_path / "model" / "manifest.json"
    data = json.loads(path.read_text())
    data["members"][0]["weight"] = 0.9
    path.write_text(json.dumps(data))
    with pytest.raises(RareMLError, match="was changed after it was written"):
        load_model(tmp_path / "model")


def test_an_unknown_family_is_one_clear_error():
    with pytest.raises(RareMLError, match=r"unknown model family 'forest' \(known: .*linear.*xgboost"):
        family("forest")


def test_greedy_selection_blends_complementary_families_and_drops_useless_ones():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 3000)
    view_a, view_b = y + rng.normal(0, 1.0, 3000), y + rng.normal(0, 1.0, 3000)  # two independent, equal views
    sigmoid = lambda s: 1 / (1 + np.exp(-s))
    weights = select(y, {"a": sigmoid(view_a), "b": sigmoid(view_b), "noise": sigmoid(rng.normal(size=3000))})
    assert set(weights) == {"a", "b"} and sum(weights.values()) == pytest.approx(1.0)
    assert 0.3 <= weights["a"] <= 0.7
    blended = blend([sigmoid(view_a), sigmoid(view_b)], [weights["a"], weights["b"]])
    assert metrics.average_precision(y, blended) > max(metrics.average_precision(y, sigmoid(v)) for v in (view_a, view_b))
    strong = sigmoid(y * 4 + rng.normal(0, 0.5, 3000))
    assert select(y, {"strong": strong, "weak": sigmoid(view_a)}) == {"strong": 1.0}
    assert select(y, {"only": strong}) == {"only": 1.0}
