"""Metrics for rare positives: ranking (AP, ROC-AUC), probability (Brier, log-loss, ECE),
the threshold curve and its choice, and bootstrap confidence intervals.

Ranking metrics take per-row weights so that one sort serves a thousand bootstrap resamples
(a resample is a vector of counts); with unit weights they equal scikit-learn's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from rareml.config import ThresholdPolicy
from rareml.errors import RareMLError


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap 95% interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    metric: str
    value: float
    precision: float
    recall: float
    met: bool = True  # False when a precision/recall floor could not be reached

    def to_dict(self) -> dict:
        return asdict(self)


def _cum_counts(y_sorted: np.ndarray, s_sorted: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted true and false positives when predicting positive at each distinct score (descending)."""
    ends = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tp = np.cumsum(w * y_sorted)[ends]
    fp = np.cumsum(w * (1 - y_sorted))[ends]
    return tp, fp


def _ap_auc(tp: np.ndarray, fp: np.ndarray) -> tuple[float, float]:
    if tp[-1] == 0 or fp[-1] == 0:
        return float("nan"), float("nan")
    recall_step = np.diff(np.r_[0.0, tp]) / tp[-1]
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    ap = float(np.sum(recall_step * precision))
    tpr, fpr = np.r_[0.0, tp / tp[-1]], np.r_[0.0, fp / fp[-1]]
    return ap, float(np.trapezoid(tpr, fpr))


def _sort(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(-s, kind="mergesort")
    return y[order].astype(float), s[order], order


def _ranking(y: np.ndarray, s: np.ndarray, w: np.ndarray | None) -> tuple[float, float]:
    ys, ss, order = _sort(np.asarray(y), np.asarray(s, float))
    return _ap_auc(*_cum_counts(ys, ss, np.ones_like(ys) if w is None else np.asarray(w, float)[order]))


def average_precision(y: np.ndarray, s: np.ndarray, w: np.ndarray | None = None) -> float:
    return _ranking(y, s, w)[0]


def roc_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray | None = None) -> float:
    return _ranking(y, s, w)[1]


def brier(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    return float(np.average((np.asarray(p, float) - y) ** 2, weights=w))


def log_loss(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    p = np.clip(np.asarray(p, float), 1e-15, 1 - 1e-15)
    return float(np.average(-(y * np.log(p) + (1 - y) * np.log(1 - p)), weights=w))


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over equal-mass bins (equal-width bins would put almost every
    prediction of a rare event into the first bin)."""
    order = np.argsort(p, kind="mergesort")
    chunks = np.array_split(order, bins)
    return float(sum(len(c) * abs(np.mean(p[c]) - np.mean(y[c])) for c in chunks if len(c)) / len(p))


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Mean predicted vs observed rate per equal-mass bin (the reliability diagram's points)."""
    chunks = [c for c in np.array_split(np.argsort(p, kind="mergesort"), bins) if len(c)]
    return np.array([p[c].mean() for c in chunks]), np.array([y[c].mean() for c in chunks])


def threshold_curve(y: np.ndarray, p: np.ndarray, policy: ThresholdPolicy) -> dict[str, np.ndarray]:
    """For each distinct score t (predict positive when p >= t): counts and every selectable metric."""
    ys, ss, _ = _sort(np.asarray(y), np.asarray(p, float))
    tp, fp = _cum_counts(ys, ss, np.ones_like(ys))
    thresholds = ss[np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]]
    pos, n = tp[-1], len(ys)
    fn, tn = pos - tp, (n - pos) - fp
    precision, recall = tp / (tp + fp), tp / pos
    b2 = policy.beta**2
    with np.errstate(invalid="ignore", divide="ignore"):
        mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return {"threshold": thresholds, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
                "precision": precision, "recall": recall,
                "f1": np.nan_to_num(2 * precision * recall / (precision + recall)),
                "fbeta": np.nan_to_num((1 + b2) * precision * recall / (b2 * precision + recall)),
                "mcc": np.nan_to_num(mcc), "cost": (fp * policy.cost_fp + fn * policy.cost_fn) / n}


def choose_threshold(y: np.ndarray, p: np.ndarray, policy: ThresholdPolicy) -> ThresholdChoice:
    """Pick the production threshold on (calibrated, out-of-fold) scores by the config's metric."""
    if np.sum(y) == 0:
        raise RareMLError("cannot choose a threshold: no positives in the scores given")
    c = threshold_curve(y, p, policy)
    met = True
    if policy.metric in ("f1", "fbeta", "mcc"):
        i = int(np.argmax(c[policy.metric]))
    elif policy.metric == "cost":
        i = int(np.argmin(c["cost"]))
    else:
        floor_on, best_on = ("precision", "recall") if policy.metric == "min_precision" else ("recall", "precision")
        ok = c[floor_on] >= getattr(policy, policy.metric)
        met = bool(ok.any())
        # the floor cannot be met: fall back to the threshold that comes closest to it
        i = int(np.argmax(np.where(ok, c[best_on], -np.inf))) if met else int(np.argmax(c[floor_on]))
    key = policy.metric if policy.metric in c else ("recall" if policy.metric == "min_precision" else "precision")
    return ThresholdChoice(threshold=float(c["threshold"][i]), metric=policy.metric, value=float(c[key][i]),
                           precision=float(c["precision"][i]), recall=float(c["recall"][i]), met=met)


def at_threshold(y: np.ndarray, p: np.ndarray, t: float, w: np.ndarray | None = None) -> dict[str, float]:
    w = np.ones(len(y)) if w is None else w
    pred = np.asarray(p) >= t
    tp, fp = float(np.sum(w * y * pred)), float(np.sum(w * (1 - y) * pred))
    fn = float(np.sum(w * y * ~pred))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "positive_rate": float(np.sum(w * pred) / np.sum(w))}


def evaluate(y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int = 1000,
             seed: int = 0) -> dict[str, Estimate]:
    """Test metrics with bootstrap 95% intervals (percentile method, resampling rows)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    ys, ps, _ = _sort(y, p)

    def all_metrics(w: np.ndarray) -> dict[str, float]:
        ap, auc = _ap_auc(*_cum_counts(ys, ps, w))
        return {"average_precision": ap, "roc_auc": auc, "brier": brier(ys, ps, w),
                "log_loss": log_loss(ys, ps, w), **at_threshold(ys, ps, threshold, w)}

    point = all_metrics(np.ones(len(ys)))
    rng = np.random.default_rng(seed)
    draws = [all_metrics(np.bincount(rng.integers(0, len(ys), len(ys)), minlength=len(ys)).astype(float))
             for _ in range(n_boot)]
    out = {}
    for name, value in point.items():
        values = np.array([d[name] for d in draws])
        low, high = np.nanpercentile(values, [2.5, 97.5]) if n_boot else (np.nan, np.nan)
        out[name] = Estimate(value, float(low), float(high))
    return out


def paired_difference(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, n_boot: int = 1000,
                      seed: int = 0) -> dict[str, Estimate]:
    """Two models' scores on the same rows: each one's average precision and Brier score, and the
    differences b - a, with 95% intervals from one paired bootstrap (the same resampled rows for
    both, so what the rows share cancels out of the difference)."""
    y = np.asarray(y, float)
    ya, pa, order_a = _sort(y, np.asarray(p_a, float))
    yb, pb, order_b = _sort(y, np.asarray(p_b, float))

    def both(w: np.ndarray) -> dict[str, float]:
        wa, wb = w[order_a], w[order_b]
        ap_a, ap_b = _ap_auc(*_cum_counts(ya, pa, wa))[0], _ap_auc(*_cum_counts(yb, pb, wb))[0]
        brier_a, brier_b = brier(ya, pa, wa), brier(yb, pb, wb)
        return {"average_precision_a": ap_a, "average_precision_b": ap_b, "average_precision_difference": ap_b - ap_a,
                "brier_a": brier_a, "brier_b": brier_b, "brier_difference": brier_b - brier_a}

    point = both(np.ones(len(y)))
    rng = np.random.default_rng(seed)
    draws = [both(np.bincount(rng.integers(0, len(y), len(y)), minlength=len(y)).astype(float)) for _ in range(n_boot)]
    out = {}
    for name, value in point.items():
        low, high = np.nanpercentile([d[name] for d in draws], [2.5, 97.5]) if n_boot else (np.nan, np.nan)
        out[name] = Estimate(value, float(low), float(high))
    return out


def no_skill(y: np.ndarray) -> dict[str, float]:
    """What a model that knows only the base rate scores: the floor every figure is read against."""
    rate = float(np.mean(y))
    return {"average_precision": rate, "roc_auc": 0.5, "brier": rate * (1 - rate),
            "log_loss": log_loss(np.asarray(y, float), np.full(len(y), rate))}


def group_rates(y: np.ndarray, decision: np.ndarray, groups: np.ndarray) -> dict[str, dict[str, float]]:
    """Per group: size, selection rate (share decided positive) and true-positive rate (recall);
    the fairness table of the model card and the baseline for live fairness monitoring."""
    out = {}
    for g in sorted(set(groups[~(groups != groups)].tolist())):  # noqa: PLR0124 (groups != groups finds NaN)
        m = groups == g
        pos = m & (y == 1)
        out[str(g)] = {"n": int(m.sum()), "selection_rate": float(decision[m].mean()),
                       "true_positive_rate": float(decision[pos].mean()) if pos.any() else float("nan")}
    return out
