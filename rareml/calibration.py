"""Probability calibration as plain data: none, sigmoid (Platt on the logit) or isotonic.

Fitted on out-of-fold scores, so the calibrator never sees a score of a row its model trained on.
Stored as JSON (two numbers, or the isotonic knots), applied with numpy: no pickle anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rareml import metrics

METHODS = ("none", "sigmoid", "isotonic")
_EPS = 1e-7
# Isotonic regression is a step function: it would give a block of raw scores one probability,
# erase their order, and lower average precision (seen: 0.20 -> 0.18 on resume_callback). Mixing in
# this share of the raw score keeps the model's ranking intact and moves no probability by more.
_KEEP_ORDER = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, float), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


@dataclass(frozen=True)
class Calibrator:
    """Maps a raw model score to a calibrated probability."""

    method: str = "none"
    a: float = 1.0  # sigmoid: p' = 1 / (1 + exp(-(a * logit(p) + b)))
    b: float = 0.0
    x: tuple[float, ...] = ()  # isotonic: knots, linear in between, clipped outside
    y: tuple[float, ...] = ()

    def predict(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, float)
        if self.method == "sigmoid":
            return 1.0 / (1.0 + np.exp(-(self.a * _logit(p) + self.b)))
        if self.method == "isotonic":
            return (1 - _KEEP_ORDER) * np.interp(p, self.x, self.y) + _KEEP_ORDER * p
        return p

    def to_dict(self) -> dict:
        return {"method": self.method, "a": self.a, "b": self.b, "x": list(self.x), "y": list(self.y)}

    @classmethod
    def from_dict(cls, d: dict) -> Calibrator:
        if d.get("method") not in METHODS:
            raise ValueError(f"unknown calibration method {d.get('method')!r}")
        return cls(method=d["method"], a=float(d["a"]), b=float(d["b"]),
                   x=tuple(map(float, d["x"])), y=tuple(map(float, d["y"])))


def fit_calibrator(method: str, y: np.ndarray, p: np.ndarray) -> Calibrator:
    from sklearn.isotonic import IsotonicRegression  # fitting needs scikit-learn; applying does not (the Space)
    from sklearn.linear_model import LogisticRegression

    if method == "sigmoid":
        lr = LogisticRegression(C=1e6, max_iter=1000).fit(_logit(p).reshape(-1, 1), y)
        if lr.coef_[0, 0] <= 0:  # a decreasing map would reverse the model's ranking: keep the scores
            return Calibrator("none")
        return Calibrator("sigmoid", a=float(lr.coef_[0, 0]), b=float(lr.intercept_[0]))
    if method == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
        return Calibrator("isotonic", x=tuple(iso.X_thresholds_.tolist()), y=tuple(iso.y_thresholds_.tolist()))
    return Calibrator("none")


def select_calibrator(y: np.ndarray, p: np.ndarray, folds: int = 5,
                      seed: int = 0) -> tuple[Calibrator, dict[str, dict[str, float]]]:
    """Compare the methods by cross-validated Brier (log-loss breaks ties) on the out-of-fold
    scores; refit the winner on all of them. Returns it and each method's scores."""
    from sklearn.model_selection import StratifiedKFold

    y, p = np.asarray(y), np.asarray(p, float)
    held_out = {m: np.empty(len(p)) for m in METHODS}
    for fit_idx, eval_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(p, y):
        for m in METHODS:
            held_out[m][eval_idx] = fit_calibrator(m, y[fit_idx], p[fit_idx]).predict(p[eval_idx])
    scores = {m: {"brier": metrics.brier(y, q), "log_loss": metrics.log_loss(y, q), "ece": metrics.ece(y, q)}
              for m, q in held_out.items()}
    best = min(METHODS, key=lambda m: (round(scores[m]["brier"], 6), scores[m]["log_loss"]))
    return fit_calibrator(best, y, p), scores
