"""The final model on small data: the best few trials averaged into one XGBoost booster, chosen by
the out-of-fold average precision of their mean."""
from __future__ import annotations

import importlib

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from rareml import metrics
from rareml.families import blend as mean_margin
from rareml.families import family
from rareml.families.xgboost import average_boosters
from rareml.predictor import TreeEnsemble

tune = importlib.import_module("02_tune")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"a": rng.normal(size=600), "b": pd.Categorical(rng.choice(list("xyz"), 600)),
                      "c": rng.normal(size=600)})
    X.loc[::7, "a"] = np.nan
    y = ((X["a"].fillna(0) + (X["b"] == "y") + rng.normal(0, 0.5, 600)) > 0.8).astype(int)
    return X, xgb.DMatrix(X, label=y, enable_categorical=True)


def members(d: xgb.DMatrix) -> list[xgb.Booster]:
    return [xgb.train({"objective": "binary:logistic", "seed": seed, "subsample": 0.7, "learning_rate": 0.3} | shape,
                      d, rounds)
            for seed, shape, rounds in ((0, {"max_depth": 3}, 5), (1, {"max_depth": 5}, 9),
                                        (2, {"grow_policy": "lossguide", "max_depth": 0, "max_leaves": 6}, 4))]


def test_averaged_booster_predicts_the_mean_log_odds(data, tmp_path):
    X, d = data
    boosters = members(d)
    merged = average_boosters(boosters)
    assert merged.num_boosted_rounds() == sum(b.num_boosted_rounds() for b in boosters)
    margins = np.mean([b.predict(d, output_margin=True) for b in boosters], axis=0)
    np.testing.assert_allclose(merged.predict(d, output_margin=True), margins, atol=2e-6)
    np.testing.assert_allclose(merged.predict(d), mean_margin([b.predict(d) for b in boosters]), atol=1e-6)
    # saved in XGBoost's own format and loaded back: the same numbers
    merged.save_model(tmp_path / "model.ubj")
    again = xgb.Booster(model_file=str(tmp_path / "model.ubj"))
    np.testing.assert_array_equal(again.predict(d), merged.predict(d))
    # the serving path's compiled trees and SHAP values agree with it
    rows = X.assign(b=X["b"].cat.codes.astype(float).where(X["b"].notna())).to_numpy(float)
    np.testing.assert_array_equal(TreeEnsemble.from_booster(merged).predict(rows), merged.inplace_predict(rows))
    contributions = merged.predict(d, pred_contribs=True)
    np.testing.assert_allclose(contributions.sum(axis=1), merged.predict(d, output_margin=True), atol=1e-5)


def test_one_member_is_the_member_itself(data):
    booster = members(data[1])[0]
    assert average_boosters([booster]) is booster
    p = booster.predict(data[1])
    assert mean_margin([p]) is p


def _objective(y: np.ndarray, candidates: list, refits: int):
    objective = object.__new__(tune.Objective)  # the selection alone: no folds, no MLflow
    objective.y, objective.top, objective.refits = y, candidates, refits
    objective.fam = family("xgboost")
    return objective


def test_ensemble_takes_as_many_of_the_best_as_raise_out_of_fold_ap():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    signal = [y + rng.normal(0, 1.2, 400) for _ in range(4)]  # four equally good, independent views
    oofs = [1 / (1 + np.exp(-s)) for s in signal]
    noise = 1 / (1 + np.exp(-rng.normal(size=400)))
    make = tune.Candidate
    candidates = [make(i, value, {"encoding": encoding}, oof, [10]) for i, (value, encoding, oof) in enumerate(
        ((0.9, "native", oofs[0]), (0.8, "ordinal", oofs[1]), (0.7, "native", oofs[2]), (0.6, "native", oofs[3]),
         (0.5, "native", noise)))]
    chosen = _objective(y, candidates, refits=5).ensemble()
    assert [c.number for c in chosen] == [0, 2, 3]  # the ordinal trial cannot share a booster; noise lowers AP
    assert metrics.average_precision(y, mean_margin([c.oof for c in chosen])) > \
        metrics.average_precision(y, oofs[0])
    assert [c.number for c in _objective(y, candidates, refits=1).ensemble()] == [0]  # large data: one model
