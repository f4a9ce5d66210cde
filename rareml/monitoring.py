"""Live signals over a window of recent predictions: data drift per feature and prediction drift
(PSI against the training reference in the model manifest), positive-decision rate, fairness gaps
between groups, and precision, recall and average precision from delayed labels.

Pure functions of a window (rareml.store), so the API, the simulator and reports compute them the
same way. PSI = sum((a - e) * ln(a / e)) over bins: below 0.1 stable, 0.1-0.2 moderate, above 0.2 drift.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from rareml import metrics
from rareml.features import CATEGORICAL, UNSEEN, Schema, level_of
from rareml.store import Labeled, Window

RARE_LEVEL = 0.01  # levels rarer than this in training share one bin with unseen levels: less noise
MIN_SHARE = 1e-4  # floor for empty bins, so that PSI stays finite
FAIRNESS_BOUND = 0.2  # largest selection-rate or true-positive-rate gap between groups: the alert's, the gate's
MIN_GROUP = 20  # predictions a group needs before its selection rate counts
MIN_GROUP_POSITIVES = 10  # labeled positives a group needs before its true-positive rate counts


@dataclass(frozen=True)
class Signals:
    predictions: int
    positive_rate: float
    feature_psi: dict[str, float]
    score_psi: float
    labeled: int
    precision: float
    recall: float
    average_precision: float
    selection_rate: dict[str, dict[str, float]] = field(default_factory=dict)  # attribute -> group -> rate
    selection_rate_gap: dict[str, float] = field(default_factory=dict)
    true_positive_rate_gap: dict[str, float] = field(default_factory=dict)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index between two share vectors over the same bins."""
    keep = (expected > 0) | (actual > 0)
    e, a = np.maximum(expected[keep], MIN_SHARE), np.maximum(actual[keep], MIN_SHARE)
    return float(np.sum((a - e) * np.log(a / e)))


def numeric_shares(reference: dict, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference and window shares over the reference's quantile bins plus a missing bin."""
    finite = values[~np.isnan(values)]
    counts = np.bincount(np.searchsorted(reference["edges"], finite, side="left"), minlength=len(reference["shares"]))
    expected = np.append(reference["shares"], reference["missing"])
    return expected, np.append(counts, len(values) - len(finite)) / max(len(values), 1)


def categorical_shares(reference: dict, categories: tuple[str, ...], codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shares of the common training levels, one bin for rare and unseen levels, one for missing."""
    ref = np.array([reference["shares"].get(c, 0.0) for c in categories])
    common = ref >= RARE_LEVEL
    missing = np.isnan(codes)
    known = codes[~missing & (codes != UNSEEN)].astype(int)
    counts = np.bincount(known, minlength=len(categories))
    n = max(len(codes), 1)
    expected = np.concatenate([ref[common], [1 - ref[common].sum() - reference["missing"], reference["missing"]]])
    actual = np.concatenate([counts[common], [len(codes) - missing.sum() - counts[common].sum(), missing.sum()]]) / n
    return np.clip(expected, 0, 1), actual


def feature_drift(schema: Schema, reference: dict, rows: np.ndarray) -> dict[str, float]:
    out = {}
    for i, f in enumerate(schema.features):
        if f.kind == CATEGORICAL:
            out[f.name] = psi(*categorical_shares(reference[f.name], f.categories, rows[:, i]))
        else:
            out[f.name] = psi(*numeric_shares(reference[f.name], rows[:, i]))
    return out


def group_values(schema: Schema, rows: np.ndarray, extras: list[dict], attribute: str) -> np.ndarray:
    """Each prediction's group for a sensitive attribute: decoded from its row when the attribute is
    a feature, else from the values recorded beside it; "nan" when missing or unseen."""
    if attribute in schema.names:
        i = schema.names.index(attribute)
        f = schema.features[i]
        if f.kind == CATEGORICAL:
            levels = np.array(list(f.categories) + ["nan"], dtype=object)
            codes = rows[:, i]
            return levels[np.where(np.isnan(codes) | (codes == UNSEEN), len(f.categories), codes).astype(int)]
        return np.array([str(level_of(v)) for v in rows[:, i]], dtype=object)
    return np.array([str(level_of(e.get(attribute))) for e in extras], dtype=object)


def _gap(rates: dict[str, float]) -> float:
    return max(rates.values()) - min(rates.values()) if len(rates) >= 2 else math.nan


def fairness(schema: Schema, window: Window, labeled: Labeled) -> tuple[dict, dict, dict]:
    """Per sensitive attribute: selection rate per group (window), its gap, and the gap in
    true-positive rate (labeled window); groups too small to judge are left out."""
    rates, selection_gap, tpr_gap = {}, {}, {}
    for attribute in schema.sensitive:
        groups = group_values(schema, window.rows, window.extras, attribute)
        rates[attribute] = {g: float(window.decision[groups == g].mean()) for g in set(groups.tolist())
                            if g != "nan" and (groups == g).sum() >= MIN_GROUP}
        selection_gap[attribute] = _gap(rates[attribute])
        lab_groups = group_values(schema, labeled.rows, labeled.extras, attribute)
        positives = labeled.label == 1
        tpr = {g: float(labeled.decision[positives & (lab_groups == g)].mean()) for g in set(lab_groups.tolist())
               if g != "nan" and (positives & (lab_groups == g)).sum() >= MIN_GROUP_POSITIVES}
        tpr_gap[attribute] = _gap(tpr)
    return rates, selection_gap, tpr_gap


def live_performance(labeled: Labeled) -> tuple[float, float, float]:
    """Precision and recall of the decisions made, average precision of the scores (NaN if undefined)."""
    y, d = labeled.label, labeled.decision
    tp = float(np.sum(y * d))
    precision = tp / d.sum() if d.sum() else math.nan
    recall = tp / y.sum() if y.sum() else math.nan
    ap = metrics.average_precision(y, labeled.probability) if 0 < y.sum() < len(y) else math.nan
    return precision, recall, ap


def signals(schema: Schema, reference: dict, window: Window, labeled: Labeled) -> Signals:
    n = len(window.probability)
    rates, selection_gap, tpr_gap = fairness(schema, window, labeled)
    precision, recall, ap = live_performance(labeled)
    return Signals(
        predictions=n, positive_rate=float(window.decision.mean()) if n else math.nan,
        feature_psi=feature_drift(schema, reference, window.rows) if n else {},
        score_psi=psi(*numeric_shares(reference["__score__"], window.probability)) if n else math.nan,
        labeled=len(labeled.label), precision=precision, recall=recall, average_precision=ap,
        selection_rate=rates, selection_rate_gap=selection_gap, true_positive_rate_gap=tpr_gap)
