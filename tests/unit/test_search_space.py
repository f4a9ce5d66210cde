"""The XGBoost family's search space: every starting point is a point of the space, and the trial's
choices become the XGBoost parameters the final refit uses (leaf-wise trees unbounded in depth)."""
from __future__ import annotations

import importlib
import warnings

import optuna
import pytest
import xgboost as xgb

from rareml.families import Context
from rareml.families import xgboost as xgbf
from rareml.families.xgboost import ENCODINGS
from rareml.features import Feature, Schema

tune = importlib.import_module("02_tune")
SCHEMA = Schema(features=(Feature("a", "numeric"),), target="y", positive=1)


def context(spw_max: float) -> Context:
    return Context(schema=SCHEMA, spw_max=spw_max, seed=0, rows=100)


@pytest.mark.parametrize("start", xgbf.STARTS, ids=[f"start{i}" for i in range(len(xgbf.STARTS))])
def test_every_start_is_a_point_of_the_search_space(start):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FixedTrial warns about a value outside its distribution
        choice = xgbf.suggest(optuna.trial.FixedTrial(start), spw_max=15.0)
    assert choice == start and choice["encoding"] in ENCODINGS
    params = xgbf.xgb_params(choice)
    assert {k: v for k, v in params.items() if k != "max_depth" or start["grow_policy"] == "depthwise"} == \
        {k: v for k, v in start.items() if k != "encoding"}


def test_leafwise_trees_are_bounded_by_leaves_not_depth():
    lossguide = xgbf.xgb_params({"grow_policy": "lossguide", "max_leaves": 7, "learning_rate": 0.1, "encoding": "native"})
    assert lossguide == {"grow_policy": "lossguide", "max_leaves": 7, "max_depth": 0, "learning_rate": 0.1}
    depthwise = xgbf.xgb_params({"grow_policy": "depthwise", "max_depth": 4, "encoding": "ordinal"})
    assert depthwise == {"grow_policy": "depthwise", "max_depth": 4}


def test_sampled_trials_give_parameters_xgboost_trains_with():
    import numpy as np

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(300, 4)), rng.integers(0, 2, 300)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        params = xgbf.xgb_params(xgbf.suggest(trial, spw_max=3.0))
        seen.add(params["grow_policy"])
        booster = xgb.train({"objective": "binary:logistic", "verbosity": 0} | params, xgb.DMatrix(X, label=y), 3)
        # a text dump indents each node by its depth in tabs
        depth = max(len(line) - len(line.lstrip("\t")) for tree in booster.get_dump() for line in tree.splitlines())
        if params["grow_policy"] == "depthwise":
            assert depth <= params["max_depth"]
        study.tell(trial, 0.0)
    assert seen == {"depthwise", "lossguide"}


def test_row_weights_weigh_the_fitting_and_early_stopping_not_the_validation():
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    X = pd.DataFrame({"a": rng.normal(size=200), "c": pd.Categorical(rng.choice(["p", "q"], 200))})
    y, weight = (rng.random(200) < 0.2).astype(int), rng.uniform(0.5, 3.0, 200)
    folds = tune.make_folds(y, k=2, repeats=1, seed=0)
    for fold, (fit, stop, valid) in zip(folds, tune.fold_data(xgbf.FAMILY, X, y, folds, weight)):
        for encoding in ENCODINGS:
            fit_e, stop_e, valid_e = fit[encoding], stop[encoding], valid[encoding]
            assert len(fit_e.get_weight()) == fit_e.num_row() and len(stop_e.get_weight()) == stop_e.num_row()
            assert valid_e.get_weight().size == 0
            assert sorted(np.r_[fit_e.get_weight(), stop_e.get_weight()]) == pytest.approx(
                sorted(np.delete(weight, fold.valid_idx)), rel=1e-6)
    assert tune.fold_data(xgbf.FAMILY, X, y, folds)[0][0]["native"].get_weight().size == 0


@pytest.mark.parametrize("start", xgbf.STARTS[:4], ids=[f"start{i}" for i in range(4)])
def test_a_warm_start_is_the_champions_point_of_the_search_space(start, tmp_path):
    """What 03_serialize writes in the manifest (the member's choices) gives back the trial that
    chose them, scale_pos_weight clipped into this data's range; a format-2 manifest (XGBoost
    parameters and the encoding) too."""
    import json

    chosen = start | {"scale_pos_weight": 40.0}
    for manifest in ({"format_version": 3, "members": [{"family": "xgboost", "weight": 1.0, "files": ["x.ubj"],
                                                        "choice": chosen}]},
                     {"format_version": 2, "params": xgbf.base_params(0) | xgbf.xgb_params(chosen) | {"n_estimators": 99},
                      "encoding": chosen["encoding"]}):
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        warm = tune.warm_starts(tmp_path, context(15.0))
        assert warm == {"xgboost": chosen | {"scale_pos_weight": 15.0}}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            xgbf.suggest(optuna.trial.FixedTrial(warm["xgboost"]), spw_max=15.0)


def test_a_warm_start_the_search_cannot_use_is_clipped_or_skipped_with_a_warning(tmp_path, caplog):
    import json

    def warm(choice: dict, encoding: str = "native") -> dict | None:
        member = {"family": "xgboost", "weight": 1.0, "files": ["x.ubj"], "choice": choice | {"encoding": encoding}}
        (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 3, "members": [member]}))
        return tune.warm_starts(tmp_path, context(3.0)).get("xgboost")

    first = {k: v for k, v in xgbf.STARTS[0].items() if k != "encoding"}
    older = first | {"learning_rate": 0.9, "max_depth": 14}  # a champion of a wider search
    assert warm(older) == xgbf.STARTS[0] | {"learning_rate": 0.3, "max_depth": 10}
    assert warm({"grow_policy": "depthwise"}) is None and "max_depth is None" in caplog.text
    assert warm(first | {"subsample": float("nan")}) is None and "subsample is nan" in caplog.text
    assert warm(first | {"grow_policy": "oblivious"}) is None
    assert warm(first, encoding="onehot") is None and "not used" in caplog.text
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 3, "members": [{"family": "forest"}]}))
    assert tune.warm_starts(tmp_path, context(3.0)) == {} and "unknown model family 'forest'" in caplog.text
