"""The numpy-compiled tree ensemble (rareml.predictor) against XGBoost itself, on small boosters
trained here: numeric features with missing values, native categorical splits (partition and
one-hot), and deep unbalanced lossguide trees."""
from __future__ import annotations

import dataclasses
import json
from functools import cache

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from hypothesis import given, settings
from hypothesis import strategies as st

from rareml.errors import RareMLError
from rareml.predictor import TreeEnsemble

PARAMS = {"objective": "binary:logistic", "tree_method": "hist", "nthread": 1, "seed": 0, "verbosity": 0}
N_ROWS, N_TREES, N_LEVELS = 400, 30, 12
CASES = ["numeric_nan", "categorical_partition", "categorical_onehot", "lossguide"]


@dataclasses.dataclass(frozen=True)
class Case:
    booster: xgb.Booster
    query: np.ndarray  # held-out rows as the model sees them: floats, category codes, NaN for missing
    categorical: tuple[int, ...]  # columns holding category codes


def _numeric(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5)) * [1, 3, 10, 0.01, 100]
    y = (np.nan_to_num(X[:, 0]) + np.nan_to_num(X[:, 1]) / 3 - np.nan_to_num(X[:, 3]) * 50
         + rng.normal(size=n) * 0.7 > 0.6).astype(int)
    X[rng.random(X.shape) < 0.15] = np.nan
    X[:, 4] = np.round(X[:, 4])  # many ties: values land exactly on split points
    return X, y


def _categorical(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    levels = [f"L{i}" for i in range(N_LEVELS)]
    codes = rng.integers(0, N_LEVELS, n)
    x = rng.normal(size=n)
    effect = np.array([(i % 3) - 1 for i in range(N_LEVELS)], dtype=float)
    y = (effect[codes] + x + rng.normal(size=n) * 0.5 > 0.3).astype(int)
    cat = pd.Categorical.from_codes(codes, categories=levels)
    frame = pd.DataFrame({"x": x, "c": cat, "z": rng.normal(size=n)})
    frame.loc[rng.random(n) < 0.1, "c"] = np.nan
    frame.loc[rng.random(n) < 0.1, "x"] = np.nan
    return frame, y


def _codes(frame: pd.DataFrame) -> np.ndarray:
    """A frame with a category column as the serving path sends it: codes as floats, NaN for missing."""
    return frame.assign(c=frame["c"].cat.codes.astype(float).where(frame["c"].notna())).to_numpy(dtype=float)


@cache
def case(name: str) -> Case:
    if name in ("numeric_nan", "lossguide"):
        X, y = _numeric(N_ROWS, 0)
        params = PARAMS | ({"max_depth": 4} if name == "numeric_nan" else
                           {"grow_policy": "lossguide", "max_depth": 0, "max_leaves": 24, "min_child_weight": 0.1})
        booster = xgb.train(params, xgb.DMatrix(X, label=y), N_TREES)
        query = np.vstack([_numeric(300, 1)[0], np.full((1, 5), np.nan), X[:50]])
        return Case(booster, query, ())
    frame, y = _categorical(N_ROWS, 0)
    onehot = 1 if name == "categorical_partition" else 64  # 1: partition splits, 64: one category per split
    booster = xgb.train(PARAMS | {"max_depth": 5, "max_cat_to_onehot": onehot},
                        xgb.DMatrix(frame, label=y, enable_categorical=True), N_TREES)
    query = _codes(_categorical(300, 1)[0])
    return Case(booster, np.vstack([query, np.full((1, 3), np.nan)]), (1,))


def xgb_base_margin(booster: xgb.Booster) -> np.float32:
    """XGBoost's own base margin for this booster: the margin of a model with the same base score and no trees."""
    learner = json.loads(booster.save_raw("json"))["learner"]
    base = float(str(learner["learner_model_param"]["base_score"]).strip("[]"))
    X = np.zeros((2, 1))
    empty = xgb.train(PARAMS | {"base_score": base}, xgb.DMatrix(X, label=[0, 1]), 0)
    return empty.inplace_predict(X[:1], predict_type="margin")[0]


def assert_matches_xgboost(ensemble: TreeEnsemble, booster: xgb.Booster, X: np.ndarray, n_trees: int = 0) -> None:
    rounds = (0, n_trees)
    np.testing.assert_allclose(ensemble.predict(X), booster.inplace_predict(X, iteration_range=rounds),
                               rtol=1e-6, atol=1e-9)
    # The tree walk and the float32 sum are bit-exact (the base margin too: see test_base_margin_is_bit_identical_to_xgboost).
    exact = dataclasses.replace(ensemble, base_margin=xgb_base_margin(booster))
    np.testing.assert_array_equal(exact.margin(X), booster.inplace_predict(X, predict_type="margin",
                                                                          iteration_range=rounds))
    # As compiled, the margin is at most one float32 ulp away.
    expected = booster.inplace_predict(X, predict_type="margin", iteration_range=rounds)
    assert np.all(np.abs(ensemble.margin(X) - expected) <= np.spacing(np.abs(expected)))


@pytest.mark.parametrize("name", CASES)
def test_compiled_trees_predict_as_xgboost(name):
    c = case(name)
    ensemble = TreeEnsemble.from_booster(c.booster)
    assert len(ensemble.roots) == N_TREES
    assert_matches_xgboost(ensemble, c.booster, c.query)
    p = ensemble.predict(c.query)
    assert p.dtype == np.float32 and p.shape == (len(c.query),)
    assert np.all((p > 0) & (p < 1))


@pytest.mark.parametrize("name", CASES)
def test_single_rows_and_one_dimensional_input(name):
    c = case(name)
    ensemble = TreeEnsemble.from_booster(c.booster)
    for row in c.query[::10]:
        assert ensemble.predict(row).shape == (1,)
        np.testing.assert_allclose(ensemble.predict(row), c.booster.inplace_predict(row[None]), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", CASES)
def test_first_trees_only_match_iteration_range(name):
    c = case(name)
    assert_matches_xgboost(TreeEnsemble.from_booster(c.booster, 7), c.booster, c.query, n_trees=7)


@pytest.mark.parametrize("name", CASES)
def test_one_row_walk_is_bit_exact(name):
    """One row takes its own walk (every node tested at once, then a gather per level): row by row
    it matches XGBoost exactly, deep lossguide trees and categorical splits included."""
    c = case(name)
    ensemble = TreeEnsemble.from_booster(c.booster)
    exact = dataclasses.replace(ensemble, base_margin=xgb_base_margin(c.booster))
    one_at_a_time = np.concatenate([exact.margin(row) for row in c.query])
    np.testing.assert_array_equal(one_at_a_time, c.booster.inplace_predict(c.query, predict_type="margin"))


def test_lossguide_trees_are_deeper_than_depthwise():
    assert TreeEnsemble.from_booster(case("lossguide").booster).depth > TreeEnsemble.from_booster(
        case("numeric_nan").booster).depth >= 3


@pytest.mark.parametrize("name", ["categorical_partition", "categorical_onehot"])
def test_categorical_splits_are_compiled_and_numpy_codes_mean_what_pandas_categories_mean(name):
    c = case(name)
    ensemble = TreeEnsemble.from_booster(c.booster)
    assert ensemble.cat_base.size and ensemble.in_set.any()  # categorical splits were compiled
    frame = _categorical(100, 2)[0]
    np.testing.assert_array_equal(c.booster.inplace_predict(frame), c.booster.inplace_predict(_codes(frame)))
    np.testing.assert_allclose(ensemble.predict(_codes(frame)), c.booster.inplace_predict(frame), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["categorical_partition", "categorical_onehot"])
@pytest.mark.parametrize("code", [-3, -1, -0.5, 0.5, N_LEVELS - 0.5, N_LEVELS, N_LEVELS + 1, 31, 32, 33, 63, 64, 999, 1e6])
def test_category_codes_beyond_the_known_levels_match_xgboost(name, code):
    c = case(name)
    X = c.query[:40].copy()
    X[:, 1] = code
    assert_matches_xgboost(TreeEnsemble.from_booster(c.booster), c.booster, X)


def _splits(name: str) -> list[tuple[int, int, float]]:
    """(tree, feature, value) of every numeric split, read from XGBoost's own JSON dump; roots first."""
    trees = json.loads(case(name).booster.save_raw("json"))["learner"]["gradient_booster"]["model"]["trees"]
    found = []
    for t, tree in enumerate(trees):
        categorical = set(tree.get("categories_nodes", []))
        found += [(t, f, v) for node, (left, f, v) in enumerate(zip(tree["left_children"], tree["split_indices"],
                                                                    tree["split_conditions"]))
                  if left != -1 and node not in categorical]
    return found


def _near(value: float) -> list[float]:
    """The value, its float32 neighbours, and float64 values that round onto it in float32."""
    v32 = np.float32(value)
    return [value, float(np.nextafter(v32, np.float32(np.inf))), float(np.nextafter(v32, np.float32(-np.inf))),
            value + abs(value) * 1e-9, value - abs(value) * 1e-9]


@pytest.mark.parametrize("name", CASES)
def test_values_on_and_next_to_each_root_split(name):
    """Every tree's root is visited, so a row holding its split value tests `x < split` exactly there."""
    c = case(name)
    ensemble = TreeEnsemble.from_booster(c.booster)
    trees = json.loads(c.booster.save_raw("json"))["learner"]["gradient_booster"]["model"]["trees"]
    roots = [(tree["split_indices"][0], tree["split_conditions"][0]) for tree in trees
             if tree["left_children"][0] != -1 and 0 not in tree.get("categories_nodes", [])]
    assert roots
    X = []
    for f, v in roots:
        for value in _near(v):
            for base in c.query[:3]:
                row = base.copy()
                row[f] = value
                X.append(row)
    X = np.array(X)
    assert_matches_xgboost(ensemble, c.booster, X)
    for row in X[::3]:
        assert_matches_xgboost(ensemble, c.booster, row[None])


def rows(name: str):
    """Rows whose values sit on, next to and between the split points of their column (float64 that
    may round onto them in float32), missing, or (categorical columns) any code, known or not."""
    c = case(name)
    by_feature = {}
    for _, f, v in _splits(name):
        by_feature.setdefault(f, set()).add(v)
    def numeric(j):
        near = st.sampled_from(sorted(by_feature.get(j, {0.0}))).flatmap(lambda v: st.sampled_from(_near(v)))
        return st.one_of(near, near, st.just(np.nan), st.floats(-1e6, 1e6), st.integers(-300, 300).map(float))
    code = st.one_of(st.integers(0, N_LEVELS - 1).map(float), st.just(np.nan), st.integers(N_LEVELS, 2000).map(float))
    width = c.query.shape[1]
    return st.lists(st.tuples(*[code if j in c.categorical else numeric(j) for j in range(width)]), min_size=1,
                    max_size=20).map(lambda r: np.array(r, dtype=float))


@pytest.mark.parametrize("name", CASES)
def test_property_any_rows_match_xgboost(name):
    booster, ensemble = case(name).booster, TreeEnsemble.from_booster(case(name).booster)

    @settings(max_examples=40, deadline=None, derandomize=True)
    @given(rows(name))
    def check(X):
        assert_matches_xgboost(ensemble, booster, X)
        for row in X[:8]:  # one row at a time takes its own path
            assert_matches_xgboost(ensemble, booster, row[None])

    check()


@pytest.mark.parametrize("objective", ["reg:squarederror", "binary:logitraw", "reg:logistic", "count:poisson"])
def test_unsupported_objectives_are_refused(objective):
    X, y = _numeric(100, 0)
    booster = xgb.train(PARAMS | {"objective": objective}, xgb.DMatrix(X, label=y), 3)
    with pytest.raises(RareMLError, match=objective):
        TreeEnsemble.from_booster(booster)


def test_base_margin_is_bit_identical_to_xgboost():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 2))
    y = (X[:, 0] > 0).astype(int)
    wrong = []
    for base in np.round(rng.uniform(0.01, 0.99, 40), 4).tolist() + [0.5, 0.215]:
        booster = xgb.train(PARAMS | {"base_score": base, "max_depth": 2}, xgb.DMatrix(X, label=y), 1)
        ensemble = TreeEnsemble.from_booster(booster)
        if not np.array_equal(ensemble.margin(X), booster.inplace_predict(X, predict_type="margin")):
            wrong.append(base)
    assert not wrong, f"margin differs from XGBoost's for base scores {wrong}"
