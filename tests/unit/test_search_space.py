"""02_tune's search space: every starting point is a point of the space, and the trial's choices
become the XGBoost parameters the final refit uses (leaf-wise trees unbounded in depth)."""
from __future__ import annotations

import importlib
import warnings

import optuna
import pytest
import xgboost as xgb

from rareml.model import ENCODINGS

tune = importlib.import_module("02_tune")


@pytest.mark.parametrize("start", tune.STARTS, ids=[f"start{i}" for i in range(len(tune.STARTS))])
def test_every_start_is_a_point_of_the_search_space(start):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FixedTrial warns about a value outside its distribution
        params, encoding = tune.suggest(optuna.trial.FixedTrial(start), spw_max=15.0)
    assert encoding == start["encoding"] in ENCODINGS
    assert {k: v for k, v in params.items() if k != "max_depth" or start["grow_policy"] == "depthwise"} == \
        {k: v for k, v in start.items() if k != "encoding"}


def test_leafwise_trees_are_bounded_by_leaves_not_depth():
    lossguide = tune.xgb_params({"grow_policy": "lossguide", "max_leaves": 7, "learning_rate": 0.1, "encoding": "native"})
    assert lossguide == {"grow_policy": "lossguide", "max_leaves": 7, "max_depth": 0, "learning_rate": 0.1}
    depthwise = tune.xgb_params({"grow_policy": "depthwise", "max_depth": 4, "encoding": "ordinal"})
    assert depthwise == {"grow_policy": "depthwise", "max_depth": 4}


def test_sampled_trials_give_parameters_xgboost_trains_with():
    import numpy as np

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(300, 4)), rng.integers(0, 2, 300)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        params, _ = tune.suggest(trial, spw_max=3.0)
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
    for fold in tune.make_folds(X, y, k=2, repeats=1, seed=0, weight=weight):
        for encoding in ENCODINGS:
            fit, stop, valid = fold.fit[encoding], fold.stop[encoding], fold.valid[encoding]
            assert len(fit.get_weight()) == fit.num_row() and len(stop.get_weight()) == stop.num_row()
            assert valid.get_weight().size == 0
            assert sorted(np.r_[fit.get_weight(), stop.get_weight()]) == pytest.approx(
                sorted(np.delete(weight, fold.valid_idx)), rel=1e-6)
    assert tune.make_folds(X, y, k=2, repeats=1, seed=0)[0].fit["native"].get_weight().size == 0


@pytest.mark.parametrize("start", tune.STARTS[:4], ids=[f"start{i}" for i in range(4)])
def test_a_warm_start_is_the_champions_point_of_the_search_space(start, tmp_path):
    """What 03_serialize writes in the manifest (base and XGBoost parameters, the encoding) gives
    back the trial that chose them, scale_pos_weight clipped into this data's range."""
    import json

    from rareml.model import base_params

    chosen = start | {"scale_pos_weight": 40.0}
    manifest = {"params": base_params(0) | tune.xgb_params(chosen) | {"n_estimators": 99},
                "encoding": chosen["encoding"]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    warm = tune.warm_start(tmp_path, spw_max=15.0)
    assert warm == chosen | {"scale_pos_weight": 15.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tune.suggest(optuna.trial.FixedTrial(warm), spw_max=15.0)


def test_a_warm_start_the_search_cannot_use_is_clipped_or_skipped_with_a_warning(tmp_path, caplog):
    import json

    def warm(params: dict, encoding: str = "native") -> dict | None:
        (tmp_path / "manifest.json").write_text(json.dumps({"params": params, "encoding": encoding}))
        return tune.warm_start(tmp_path, spw_max=3.0)

    older = tune.STARTS[0] | {"learning_rate": 0.9, "max_depth": 14}  # a champion of a wider search
    assert warm(older) == tune.STARTS[0] | {"learning_rate": 0.3, "max_depth": 10}
    assert warm({"grow_policy": "depthwise"}) is None and "max_depth is None" in caplog.text
    assert warm(tune.STARTS[0] | {"subsample": float("nan")}) is None and "subsample is nan" in caplog.text
    assert warm(tune.STARTS[0] | {"grow_policy": "oblivious"}) is None
    assert warm(tune.STARTS[0], encoding="onehot") is None and "not used" in caplog.text
