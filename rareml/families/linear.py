"""The linear family: L1/L2-regularised logistic regression on the same schema.

Its terms, learned on the rows it is fitted on: each number clipped to its training range and
standardised, a missing one imputed at the mean with an indicator, and optionally also binned at
training quantiles (one-hot bins: a step function beside the slope); each category one-hot over
the schema's known levels, with one more for missing (an unseen level is missing, as everywhere).
scikit-learn fits the coefficients (lbfgs for L2, saga when there is an L1 share); they are saved
as plain JSON and scored as a sum of looked-up terms, a dot product over the one-hot design, so the
API needs numpy alone and each feature's contribution to the log-odds is exact.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from rareml.families import Context, Family, Scorer
from rareml.features import CATEGORICAL, Schema, frame_rows

if TYPE_CHECKING:
    import optuna

C_RANGE = (1e-4, 100.0)
L1_RATIOS = (0.0, 0.5, 1.0)
BINS = (0, 8)
CLASS_WEIGHTS = ("none", "balanced")
STARTS = [
    {"C": 1.0, "l1_ratio": 0.0, "bins": 0, "class_weight": "none"},
    {"C": 0.1, "l1_ratio": 0.0, "bins": 8, "class_weight": "none"},
    {"C": 1.0, "l1_ratio": 1.0, "bins": 8, "class_weight": "none"},
    {"C": 0.01, "l1_ratio": 0.0, "bins": 8, "class_weight": "balanced"},
]
MAX_ITER = {"lbfgs": 1000, "saga": 200}


@dataclass
class Rows:
    x: np.ndarray  # encoded rows (frame_rows)
    y: np.ndarray | None
    weight: np.ndarray | None


class Linear(Scorer):
    """A fitted linear model as it serves: its terms and coefficients (the JSON it is saved as)."""

    def __init__(self, spec: dict):
        self.spec = spec
        numeric = [f for f in spec["features"] if f["kind"] != CATEGORICAL]
        categorical = [f for f in spec["features"] if f["kind"] == CATEGORICAL]
        self.n_features, self.intercept = len(spec["features"]), float(spec["intercept"])
        self.num_idx = np.array([f["index"] for f in numeric], dtype=np.intp)
        for key in ("low", "high", "mean", "scale", "w", "w_missing"):
            setattr(self, key, np.array([f[key] for f in numeric], dtype=np.float64))
        self.bins = [(k, np.array(f["edges"], dtype=np.float64), np.array(f["w_bins"], dtype=np.float64))
                     for k, f in enumerate(numeric) if f["w_bins"]]
        self.cat_idx = np.array([f["index"] for f in categorical], dtype=np.intp)
        self.n_levels = np.array([len(f["w_levels"]) - 1 for f in categorical], dtype=np.float64)  # last: missing
        sizes = [len(f["w_levels"]) for f in categorical]
        self.offset = np.array(np.r_[0, np.cumsum(sizes)[:-1]] if sizes else [], dtype=np.intp)
        self.table = np.concatenate([np.array(f["w_levels"], dtype=np.float64) for f in categorical]) \
            if categorical else np.empty(0)

    def contributions(self, rows: np.ndarray) -> np.ndarray:
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
        out = np.empty((len(rows), self.n_features + 1))
        x = rows[:, self.num_idx]
        missing = np.isnan(x)
        z = np.where(missing, 0.0, (np.clip(x, self.low, self.high) - self.mean) / self.scale)
        part = z * self.w + missing * self.w_missing
        for k, edges, w_bins in self.bins:
            at = np.searchsorted(edges, np.where(missing[:, k], -np.inf, x[:, k]), side="right")
            part[:, k] += np.where(missing[:, k], 0.0, w_bins[at])
        out[:, self.num_idx] = part
        codes = rows[:, self.cat_idx]
        bad = np.isnan(codes) | (codes < 0) | (codes >= self.n_levels)
        out[:, self.cat_idx] = self.table[self.offset + np.where(bad, self.n_levels, codes).astype(np.intp)]
        out[:, -1] = self.intercept
        return out

    def raw(self, rows: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.contributions(rows).sum(axis=1)))


class Terms:
    """The design learned on some rows: what each feature becomes, before the coefficients."""

    def __init__(self, x: np.ndarray, schema: Schema, bins: int):
        self.schema = schema
        self.numeric = [i for i, f in enumerate(schema.features) if f.kind != CATEGORICAL]
        self.categorical = [i for i, f in enumerate(schema.features) if f.kind == CATEGORICAL]
        num = x[:, self.numeric]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing column: NaN statistics, replaced below
            self.low, self.high = np.nanmin(num, axis=0), np.nanmax(num, axis=0)
            self.mean, std = np.nanmean(num, axis=0), np.nanstd(num, axis=0)
        for a in (self.low, self.high, self.mean):
            a[np.isnan(a)] = 0.0
        self.scale = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        self.edges = []
        for k in range(len(self.numeric)):
            values = num[:, k][~np.isnan(num[:, k])]
            cut = np.unique(np.quantile(values, np.arange(1, bins) / bins)) if bins and len(values) else np.empty(0)
            self.edges.append(cut)
        self.levels = [len(schema.features[i].categories) for i in self.categorical]

    def widths(self) -> list[int]:
        """Columns of each block: slopes, missing indicators, each number's bins, each category's levels."""
        n = len(self.numeric)
        return [n, n, *[len(e) + 1 if len(e) else 0 for e in self.edges], *[lv + 1 for lv in self.levels]]

    def design(self, x: np.ndarray) -> sparse.csr_matrix:
        """The one-hot design (sparse) in the block order of `widths`; `Linear.contributions` computes the
        same terms by lookup."""
        n, widths = len(x), self.widths()
        starts = np.r_[0, np.cumsum(widths)]
        num = x[:, self.numeric]
        missing = np.isnan(num)
        z = np.where(missing, 0.0, (np.clip(num, self.low, self.high) - self.mean) / self.scale)
        rows, cols, vals = [], [], []
        every = np.arange(n)
        for k in range(len(self.numeric)):
            rows += [every, every[missing[:, k]]]
            cols += [np.full(n, starts[0] + k), np.full(missing[:, k].sum(), starts[1] + k)]
            vals += [z[:, k], np.ones(missing[:, k].sum())]
            if len(self.edges[k]):
                present = every[~missing[:, k]]
                at = np.searchsorted(self.edges[k], num[~missing[:, k], k], side="right")
                rows.append(present)
                cols.append(starts[2 + k] + at)
                vals.append(np.ones(len(present)))
        base = 2 + len(self.numeric)
        for j, (i, levels) in enumerate(zip(self.categorical, self.levels)):
            codes = x[:, i]
            bad = np.isnan(codes) | (codes < 0) | (codes >= levels)
            rows.append(every)
            cols.append(starts[base + j] + np.where(bad, levels, codes).astype(np.intp))
            vals.append(np.ones(n))
        if not rows:
            return sparse.csr_matrix((n, 0))
        return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                 shape=(n, starts[-1]))

    def scorer(self, coef: np.ndarray, intercept: float) -> Linear:
        """The coefficients, block by block, back onto the features they came from."""
        widths = self.widths()
        blocks = np.split(coef, np.cumsum(widths)[:-1])
        slopes, indicators = blocks[0], blocks[1]
        bins, levels = blocks[2:2 + len(self.numeric)], blocks[2 + len(self.numeric):]
        features = [None] * len(self.schema.features)
        for k, i in enumerate(self.numeric):
            features[i] = {"name": self.schema.features[i].name, "kind": "numeric", "index": i,
                           "low": float(self.low[k]), "high": float(self.high[k]), "mean": float(self.mean[k]),
                           "scale": float(self.scale[k]), "w": float(slopes[k]), "w_missing": float(indicators[k]),
                           "edges": self.edges[k].tolist(), "w_bins": bins[k].tolist()}
        for j, i in enumerate(self.categorical):
            features[i] = {"name": self.schema.features[i].name, "kind": CATEGORICAL, "index": i,
                           "w_levels": levels[j].tolist()}
        return Linear({"intercept": float(intercept), "features": features})


def fit_linear(choice: dict, x: np.ndarray, y: np.ndarray, weight: np.ndarray | None, schema: Schema,
               seed: int) -> Linear:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    terms = Terms(x, schema, int(choice["bins"]))
    solver = "saga" if choice["l1_ratio"] > 0 else "lbfgs"
    model = LogisticRegression(C=float(choice["C"]), l1_ratio=float(choice["l1_ratio"]), solver=solver,
                               max_iter=MAX_ITER[solver], tol=1e-4 if solver == "lbfgs" else 1e-3, random_state=seed,
                               class_weight="balanced" if choice["class_weight"] == "balanced" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # capped iterations: the CV score judges the fit
        model.fit(terms.design(x), y, sample_weight=weight)
    return terms.scorer(model.coef_.ravel().astype(np.float64), float(model.intercept_[0]))


class LinearFamily(Family):
    name = "linear"
    max_trials = 24  # four numbers to search: TPE has found what there is to find by then

    def starts(self, context: Context) -> list[dict]:
        return [dict(s) for s in STARTS]

    def suggest(self, trial: optuna.Trial, context: Context) -> dict:
        trial.suggest_float("C", *C_RANGE, log=True)
        trial.suggest_categorical("l1_ratio", L1_RATIOS)
        trial.suggest_categorical("bins", BINS)
        trial.suggest_categorical("class_weight", CLASS_WEIGHTS)
        return dict(trial.params)

    def search(self, context: Context) -> dict:
        return {"ranges": {"C": [*C_RANGE, "log"]}, "l1_ratio": list(L1_RATIOS), "bins": list(BINS),
                "class_weight": list(CLASS_WEIGHTS), "solvers": "lbfgs (L2), saga (with an L1 share)"}

    def warm_start(self, member: dict, context: Context) -> dict | None:
        chosen = member.get("choice")
        if not isinstance(chosen, dict) or chosen.get("l1_ratio") not in L1_RATIOS or chosen.get("bins") not in BINS \
                or chosen.get("class_weight") not in CLASS_WEIGHTS:
            return None
        c = chosen.get("C")
        if isinstance(c, bool) or not isinstance(c, int | float) or not np.isfinite(c):
            raise ValueError(f"C is {c!r}")
        return dict(chosen) | {"C": float(min(max(c, C_RANGE[0]), C_RANGE[1]))}

    def prepare(self, frame: pd.DataFrame, y: np.ndarray | None = None, weight: np.ndarray | None = None) -> Rows:
        return Rows(frame_rows(frame), y, weight)

    def fit(self, choice: dict, fit: Rows, stop: Rows, context: Context,
            deadline: Callable[[], float] | None = None) -> tuple[Linear, None]:
        """No early stopping to do: the slice is fitted on too (the fold's validation part stays unseen)."""
        weight = None if fit.weight is None else np.r_[fit.weight, stop.weight]
        return fit_linear(choice, np.r_[fit.x, stop.x], np.r_[fit.y, stop.y], weight, context.schema,
                          context.seed), None

    def scores(self, fitted: Linear, data: Rows) -> np.ndarray:
        return fitted.raw(data.x)

    def refit(self, members: list[dict], data: Rows, context: Context) -> Linear:
        return fit_linear(members[0]["choice"], data.x, data.y, data.weight, context.schema, context.seed)

    def save(self, fitted: Linear, folder: Path, stem: str) -> dict:
        (folder / f"{stem}.json").write_text(json.dumps(fitted.spec, indent=1) + "\n")
        nonzero = sum(1 for f in fitted.spec["features"] for w in [f.get("w"), f.get("w_missing"),
                      *f.get("w_bins", []), *f.get("w_levels", [])] if w)
        return {"files": [f"{stem}.json"], "coefficients": nonzero}

    def load(self, folder: Path, member: dict, schema: Schema) -> Linear:
        return Linear(json.loads((folder / member["files"][0]).read_text()))

    def scorer(self, fitted: Linear, schema: Schema) -> Linear:
        return fitted


FAMILY = LinearFamily()
