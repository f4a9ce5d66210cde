"""The XGBoost family: gradient-boosted trees, the booster saved in XGBoost's own UBJ format and
served by the compiled trees of `rareml.predictor` for a few rows (XGBoost itself for batches)."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import xgboost as xgb

from rareml.errors import RareMLError
from rareml.families import Context, Family, Scorer, logit
from rareml.features import Schema
from rareml.predictor import TreeEnsemble

if TYPE_CHECKING:
    import optuna

MAX_ROUNDS, EARLY_STOPPING = 2000, 100
ENCODINGS = ("native", "ordinal")


def base_params(seed: int) -> dict:
    """What every booster shares; the tuned parameters are added to these."""
    return {"objective": "binary:logistic", "eval_metric": "aucpr", "tree_method": "hist",
            "nthread": os.cpu_count() or 1, "seed": seed, "verbosity": 0}


def dmatrix(frame: pd.DataFrame, label: np.ndarray | None = None, encoding: str = "native",
            weight: np.ndarray | None = None) -> xgb.DMatrix:
    """Model input for XGBoost. Categoricals either as XGBoost's native categories (partition
    splits) or `ordinal`: their position among the schema's sorted levels, as a number. Which one
    wins depends on the data (on census, ordinal: high-cardinality partitions overfit), so the
    search chooses; the model folder records the choice."""
    if encoding == "ordinal":
        frame = frame.apply(lambda c: c.cat.codes.astype(float).where(c.notna()) if c.dtype == "category" else c)
    return xgb.DMatrix(frame, label=label, weight=weight, enable_categorical=encoding == "native",
                       nthread=os.cpu_count() or 1)


def train_booster(params: dict, dtrain: xgb.DMatrix, rounds: int, deval: xgb.DMatrix | None = None,
                  early_stopping: int = 50, callbacks: list | None = None) -> xgb.Booster:
    """Train; with `deval`, stop early on its average precision and keep the best iteration."""
    evals = [(deval, "eval")] if deval is not None else []
    return xgb.train(params, dtrain, num_boost_round=rounds, evals=evals, verbose_eval=False,
                     early_stopping_rounds=early_stopping if evals else None, callbacks=callbacks)


def average_boosters(boosters: list[xgb.Booster]) -> xgb.Booster:
    """One booster whose margin is the mean of the members' margins (log-odds): their trees side by
    side with leaf values divided by their number, and the base score the mean base margin. Members
    must share their input (features, types, categories); a single member comes back as it is."""
    if len(boosters) == 1:
        return boosters[0]
    models = [json.loads(b.save_raw("json")) for b in boosters]
    merged, k, trees = models[0], len(models), []
    for model in models:
        for tree in model["learner"]["gradient_booster"]["model"]["trees"]:
            tree["base_weights"] = [w / k for w in tree["base_weights"]]
            tree["split_conditions"] = [v / k if left == -1 else v  # a leaf's value sits in split_conditions
                                        for v, left in zip(tree["split_conditions"], tree["left_children"])]
            tree["id"] = len(trees)
            trees.append(tree)
    gbtree = merged["learner"]["gradient_booster"]["model"]
    gbtree.update(trees=trees, tree_info=[0] * len(trees), iteration_indptr=list(range(len(trees) + 1)))
    gbtree["gbtree_model_param"]["num_trees"] = str(len(trees))
    bases = [float(str(m["learner"]["learner_model_param"]["base_score"]).strip("[]")) for m in models]
    base = 1.0 / (1.0 + np.exp(-np.mean(logit(np.array(bases)))))
    merged["learner"]["learner_model_param"]["base_score"] = f"[{base:.9E}]"
    merged["learner"]["attributes"] = {}
    out = xgb.Booster()
    out.load_model(bytearray(json.dumps(merged).encode()))
    return out


def n_trees(booster: xgb.Booster) -> int:
    """Trees to use: up to the best iteration when early stopping found one, else all (0)."""
    best = booster.attributes().get("best_iteration")
    return int(best) + 1 if best is not None else 0


def raw_scores(booster: xgb.Booster, data: xgb.DMatrix) -> np.ndarray:
    """Uncalibrated probabilities, up to the best iteration when early stopping found one."""
    return booster.predict(data, iteration_range=(0, n_trees(booster)))


# Known-good starting points, tried before TPE explores: XGBoost's defaults; a slower, subsampled
# configuration that is strong on most tabular data, with each categorical encoding; and trees grown
# leaf by leaf as LightGBM grows them (31 leaves, any depth), the family FLAML's best configurations
# came from on the benchmark datasets.
SLOW = {"grow_policy": "depthwise", "learning_rate": 0.05, "max_depth": 6, "min_child_weight": 1.0, "subsample": 0.8,
        "colsample_bytree": 0.8, "reg_lambda": 1.0, "reg_alpha": 0.001, "scale_pos_weight": 1.0}
LEAVES = {"grow_policy": "lossguide", "max_leaves": 31, "learning_rate": 0.1, "min_child_weight": 1.0,
          "subsample": 1.0, "colsample_bytree": 1.0, "reg_lambda": 1.0, "reg_alpha": 0.001, "scale_pos_weight": 1.0}
STARTS = [
    {"grow_policy": "depthwise", "learning_rate": 0.3, "max_depth": 6, "min_child_weight": 1.0, "subsample": 1.0,
     "colsample_bytree": 1.0, "reg_lambda": 1.0, "reg_alpha": 0.001, "scale_pos_weight": 1.0, "encoding": "native"},
    SLOW | {"encoding": "ordinal"},
    SLOW | {"encoding": "native"},
    LEAVES | {"encoding": "native"},
    LEAVES | {"learning_rate": 0.05, "subsample": 0.8, "colsample_bytree": 0.8, "encoding": "ordinal"},
]
# The search space: each number's range (a log scale for those spanning orders of magnitude).
RANGES = {"max_depth": (2, 10, False), "max_leaves": (4, 256, True), "learning_rate": (0.02, 0.3, True),
          "min_child_weight": (0.1, 100.0, True), "subsample": (0.5, 1.0, False),
          "colsample_bytree": (0.3, 1.0, False), "reg_lambda": (1e-3, 1000.0, True), "reg_alpha": (1e-3, 10.0, True)}
GROW_POLICIES = ("depthwise", "lossguide")
SEARCHED = ("learning_rate", "min_child_weight", "subsample", "colsample_bytree", "reg_lambda", "reg_alpha")


def suggest(trial: optuna.Trial, spw_max: float) -> dict:
    """The search space (XGBoost parameters and the categorical encoding). Trees grow level by
    level to a depth, or leaf by leaf to a number of leaves; scale_pos_weight runs from 1 (none)
    to the negative/positive ratio."""
    size = "max_depth" if trial.suggest_categorical("grow_policy", GROW_POLICIES) == "depthwise" else "max_leaves"
    for name in (size, *SEARCHED):
        low, high, log_scale = RANGES[name]
        if isinstance(low, int):
            trial.suggest_int(name, low, high, log=log_scale)
        else:
            trial.suggest_float(name, low, high, log=log_scale)
    trial.suggest_float("scale_pos_weight", 1.0, max(spw_max, 1.0 + 1e-9), log=True)
    trial.suggest_categorical("encoding", ENCODINGS)
    return dict(trial.params)


def xgb_params(chosen: dict) -> dict:
    """A trial's choices as XGBoost parameters: leaf-wise trees are bounded by leaves, not depth."""
    params = {k: v for k, v in chosen.items() if k != "encoding"}
    if params.get("grow_policy") == "lossguide":
        params["max_depth"] = 0
    return params


def choice_of(params: dict, encoding: object) -> dict:
    """The search's choices from XGBoost parameters as a model folder of format 2 kept them."""
    size = "max_depth" if params.get("grow_policy") == "depthwise" else "max_leaves"
    keys = ("grow_policy", size, *SEARCHED, "scale_pos_weight")
    return {k: params.get(k) for k in keys} | {"encoding": encoding}


class Deadline(xgb.callback.TrainingCallback):
    """Stops boosting once the search's time is spent (the trial is then pruned, not scored)."""

    def __init__(self, at: Callable[[], float]) -> None:
        super().__init__()
        self.at = at

    def after_iteration(self, model, epoch, evals_log) -> bool:
        return time.time() > self.at()


@dataclass
class Fit:
    booster: xgb.Booster
    encoding: str


class Trees(Scorer):
    """The booster as it serves: its compiled trees (rareml.predictor) for up to SMALL rows, where
    XGBoost's per-call overhead would dominate, XGBoost for more; SHAP values from XGBoost."""

    SMALL = 32
    ONE_ROW_CHECKS = 5  # rows also checked one at a time (the one-row walk POST /predict takes)

    def __init__(self, booster: xgb.Booster, encoding: str):
        self.booster, self.encoding, self.n_trees = booster, encoding, n_trees(booster)

    @cached_property
    def ensemble(self) -> TreeEnsemble:
        return TreeEnsemble.from_booster(self.booster, self.n_trees or None)

    def raw(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) <= self.SMALL:
            return self.ensemble.predict(rows)
        return self.booster.inplace_predict(rows, iteration_range=(0, self.n_trees))

    def contributions(self, rows: np.ndarray) -> np.ndarray:
        data = xgb.DMatrix(rows, feature_names=self.booster.feature_names, feature_types=self.booster.feature_types,
                           enable_categorical=self.encoding == "native")
        return self.booster.predict(data, pred_contribs=True, iteration_range=(0, self.n_trees))

    def check(self, rows: np.ndarray) -> None:
        """Compile now rather than on the first small request (0.3 s for 1,000 leaf-wise trees), and
        hold the compiled trees to XGBoost on `rows`, many at once and one at a time."""
        ensemble = self.ensemble
        if not len(rows):
            return
        expected = self.booster.inplace_predict(rows, iteration_range=(0, self.n_trees))
        compiled = np.r_[ensemble.predict(rows), [ensemble.predict(row[None])[0] for row in rows[:self.ONE_ROW_CHECKS]]]
        expected = np.r_[expected, expected[:self.ONE_ROW_CHECKS]]
        if not np.allclose(compiled, expected, rtol=1e-5, atol=1e-7):
            raise RareMLError(f"the compiled trees disagree with XGBoost (largest difference "
                              f"{np.max(np.abs(compiled - expected)):.3g})")

    def threads(self, n: int) -> None:
        self.booster.set_param({"nthread": n})


class XGBoost(Family):
    name = "xgboost"
    averages_trials = True

    def structure(self, choice: dict) -> object:
        return choice["encoding"]  # boosters on different inputs cannot share one model

    def starts(self, context: Context) -> list[dict]:
        return [dict(s) for s in STARTS]

    def suggest(self, trial: optuna.Trial, context: Context) -> dict:
        return suggest(trial, context.spw_max)

    def search(self, context: Context) -> dict:
        return {"ranges": {k: list(v[:2]) + ["log" if v[2] else "linear"] for k, v in RANGES.items()},
                "grow_policies": list(GROW_POLICIES), "encodings": list(ENCODINGS),
                "scale_pos_weight": [1.0, context.spw_max], "early_stopping_rounds": EARLY_STOPPING,
                "max_rounds": MAX_ROUNDS}

    def warm_start(self, member: dict, context: Context) -> dict | None:
        """The member's choices, numbers clipped into this search space (a champion of an older
        one); None when they are not such a configuration."""
        chosen = member.get("choice")
        if not isinstance(chosen, dict) or chosen.get("grow_policy") not in GROW_POLICIES \
                or chosen.get("encoding") not in ENCODINGS:
            return None
        size = "max_depth" if chosen["grow_policy"] == "depthwise" else "max_leaves"
        start = {"grow_policy": chosen["grow_policy"]}
        for name in (size, *SEARCHED, "scale_pos_weight"):
            value = chosen.get(name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
                raise ValueError(f"{name} is {value!r}")
            low, high = (1.0, max(context.spw_max, 1.0)) if name == "scale_pos_weight" else RANGES[name][:2]
            start[name] = type(low)(min(max(value, low), high))
        return start | {"encoding": chosen["encoding"]}

    def prepare(self, frame: pd.DataFrame, y: np.ndarray | None = None, weight: np.ndarray | None = None) -> dict:
        return {e: dmatrix(frame, y, e, weight) for e in ENCODINGS}

    def fit(self, choice: dict, fit: dict, stop: dict, context: Context,
            deadline: Callable[[], float] | None = None) -> tuple[Fit, int]:
        encoding = choice["encoding"]
        booster = train_booster(base_params(context.seed) | xgb_params(choice), fit[encoding], MAX_ROUNDS,
                                stop[encoding], EARLY_STOPPING, callbacks=[Deadline(deadline)] if deadline else None)
        return Fit(booster, encoding), booster.best_iteration + 1

    def scores(self, fitted: Fit, data: dict) -> np.ndarray:
        return raw_scores(fitted.booster, data[fitted.encoding])

    def refit(self, members: list[dict], data: dict, context: Context) -> Fit:
        encoding = members[0]["choice"]["encoding"]
        return Fit(average_boosters([train_booster(base_params(context.seed) | xgb_params(m["choice"]), data[encoding],
                                                   m["iterations"]) for m in members]), encoding)

    def save(self, fitted: Fit, folder: Path, stem: str) -> dict:
        fitted.booster.save_model(folder / f"{stem}.ubj")
        return {"files": [f"{stem}.ubj"], "encoding": fitted.encoding,
                "trees": fitted.booster.num_boosted_rounds()}

    def load(self, folder: Path, member: dict, schema: Schema) -> Trees:
        booster = xgb.Booster()
        booster.load_model(folder / member["files"][0])
        return Trees(booster, member.get("encoding", "native"))

    def scorer(self, fitted: Fit, schema: Schema) -> Trees:
        return Trees(fitted.booster, fitted.encoding)

    def requirements(self) -> list[str]:
        return [f"xgboost=={xgb.__version__}"]


FAMILY = XGBoost()
