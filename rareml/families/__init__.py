"""Model families: each in one module behind one small interface, registered by name.

A model is one family's fit, or a weighted blend of several (their log-odds averaged: see
`rareml.model.Model`). 02_tune searches each family with the same folds and metric, 03_serialize
refits, selects or blends them, and writes one member per family into the model folder; the API,
the GUI and the monitoring see only `Model`, so adding a family touches none of them: write a module
with a `Family` subclass and add it to `REGISTRY`. Modules are imported on first use, so a model
without a TabNet member never imports torch.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from rareml.errors import RareMLError
from rareml.features import Schema

if TYPE_CHECKING:
    import optuna

# name -> module; the order is the order 02_tune searches them in (cheapest first: see 02_tune.share)
REGISTRY = {"linear": "rareml.families.linear", "xgboost": "rareml.families.xgboost"}


@dataclass(frozen=True)
class Context:
    """What a family's search and fit may depend on besides the rows."""

    schema: Schema
    spw_max: float  # negatives per positive in the training split
    seed: int
    rows: int  # training rows


class Scorer:
    """A fitted member as it serves: encoded rows in (`RecordEncoder.model_rows`: floats, a
    category as its position among the schema's levels, NaN for missing)."""

    def raw(self, rows: np.ndarray) -> np.ndarray:
        """Uncalibrated probabilities."""
        raise NotImplementedError

    def contributions(self, rows: np.ndarray) -> np.ndarray:
        """Per-feature contributions to the log-odds, last column the bias; each row sums to the logit of `raw`."""
        raise NotImplementedError

    def check(self, rows: np.ndarray) -> None:
        """A RareMLError if the fast serving path disagrees with the reference one on these rows."""

    def threads(self, n: int) -> None:
        """Threads a batch prediction may use."""


class Family:
    """One model family: its search space, its fit on a fold, its saved form."""

    name: str = ""
    averages_trials = False  # the final model may average the few best trials (02_tune, small data)
    max_trials: int | None = None  # a small space needs no more: the rest of its time goes to the next family

    def structure(self, choice: dict) -> object:
        """What trials must share for their fits to be averaged into one model (`averages_trials`)."""
        return None

    def starts(self, context: Context) -> list[dict]:
        """Known-good choices, tried before the sampler explores."""
        raise NotImplementedError

    def suggest(self, trial: optuna.Trial, context: Context) -> dict:
        """A trial's choices (JSON-able: they go into tuned.json and the manifest)."""
        raise NotImplementedError

    def search(self, context: Context) -> dict:
        """The search space, as tuned.json and the report describe it."""
        raise NotImplementedError

    def warm_start(self, member: dict, context: Context) -> dict | None:
        """The choices of a saved member (its manifest entry) as a point of this search, or None."""
        return None

    def prepare(self, frame: pd.DataFrame, y: np.ndarray | None = None, weight: np.ndarray | None = None) -> object:
        """The family's input for some rows of `to_frame`'s frame, built once per part of a fold."""
        raise NotImplementedError

    def fit(self, choice: dict, fit: object, stop: object, context: Context,
            deadline: Callable[[], float] | None = None) -> tuple[object, int | None]:
        """Fit on `fit`, stopping early on `stop`; stop once time.time() passes `deadline()` (the
        trial is then pruned). Returns the fitted model and the iterations it kept (or None)."""
        raise NotImplementedError

    def scores(self, fitted: object, data: object) -> np.ndarray:
        """Uncalibrated probabilities of a fitted model for prepared rows."""
        raise NotImplementedError

    def refit(self, members: list[dict], data: object, context: Context) -> object:
        """The final model on all training rows from the chosen trial(s): [{"choice", "iterations"}]."""
        raise NotImplementedError

    def save(self, fitted: object, folder: Path, stem: str) -> dict:
        """Write the fitted model (no pickle) as files named `stem`.*; returns {"files": [...], ...}:
        what `load` needs, kept in the manifest's member entry."""
        raise NotImplementedError

    def load(self, folder: Path, member: dict, schema: Schema) -> Scorer:
        raise NotImplementedError

    def scorer(self, fitted: object, schema: Schema) -> Scorer:
        """The in-memory fit as it will serve (what `load` of its saved files gives)."""
        raise NotImplementedError

    def requirements(self) -> list[str]:
        """pip requirements of the packages the saved member needs to load (MLflow's pyfunc)."""
        return []


def family(name: str) -> Family:
    """The family registered as `name`; a RareMLError naming the known ones otherwise."""
    if name not in REGISTRY:
        raise RareMLError(f"unknown model family {name!r} (known: {', '.join(REGISTRY)})")
    try:
        module = importlib.import_module(REGISTRY[name])
    except ImportError as exc:
        raise RareMLError(f"model family {name!r} needs a package that is not installed: {exc}") from None
    return module.FAMILY


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def blend(scores: list[np.ndarray], weights: list[float] | None = None) -> np.ndarray:
    """Probabilities of several models -> the probability of their (weighted) mean log-odds. One
    model's come back as they are, so a single-family model scores bit for bit as its member."""
    if len(scores) == 1:
        return scores[0]
    weights = np.full(len(scores), 1 / len(scores)) if weights is None else np.asarray(weights, float)
    margin = np.tensordot(weights / weights.sum(), np.stack([logit(p) for p in scores]), axes=1)
    return 1.0 / (1.0 + np.exp(-margin))


BLEND_STEPS = 20


def select(y: np.ndarray, scores: dict[str, np.ndarray], steps: int = BLEND_STEPS) -> dict[str, float]:
    """Blend weights from out-of-fold scores by greedy ensemble selection with replacement (Caruana
    et al. 2004): start from the family with the best average precision, then add, one step at a time,
    the family (any, again included) whose extra share most raises the average precision of the
    log-odds blend; stop when no step raises it. A weight is a family's share of the steps taken,
    so a family that never helps gets none, and one family alone is weight 1."""
    from rareml import metrics

    names = list(scores)
    alone = {n: metrics.average_precision(y, scores[n]) for n in names}
    counts = dict.fromkeys(names, 0)
    counts[max(names, key=alone.get)] = 1
    current = max(alone.values())
    for _ in range(steps - 1):
        tried = {}
        for name in names:
            trial = counts | {name: counts[name] + 1}
            used = [n for n in names if trial[n]]
            tried[name] = metrics.average_precision(y, blend([scores[n] for n in used], [trial[n] for n in used]))
        name = max(names, key=tried.get)
        if tried[name] <= current + 1e-9:
            break
        counts[name] += 1
        current = tried[name]
    total = sum(counts.values())
    return {n: c / total for n, c in counts.items() if c}
