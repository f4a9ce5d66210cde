"""One retraining's data and its gate (06_retrain.py): what the stages train on, and whether the
challenger they make replaces the champion.

The data: the champion's training rows as they are in the data file (the config's split, redone:
deterministic), plus the labelled production rows from the prediction log as the clients sent them
(so a level the champion never saw is learnt), weighed by the `[retrain]` policy. The most recent
labelled production rows, by the time of their prediction, are the gate set: neither model trains
on them, and it is the new run's test split.

The gate: both models score the gate set as the API would (each with its own schema, calibration
and threshold). A paired bootstrap of the difference in average precision (the same resampled rows
for both) decides: promote only if its 95% lower bound is above -margin and the difference itself
is positive, the Brier score is no worse by more than the tolerance, and no sensitive attribute's
gap between groups (selection rate, true-positive rate) is above the API's fairness bound unless
the champion's is at least as wide (the challenger must not make fairness worse).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rareml import metrics
from rareml.config import Config, RetrainPolicy
from rareml.data import TEST_FLAG, load_tables, prepare, split
from rareml.errors import RareMLError
from rareml.features import category_strings, level_of
from rareml.monitoring import MIN_GROUP, MIN_GROUP_POSITIVES

WEIGHT_COLUMN = "rareml_retrain_weight"  # a retraining table's weights, when the config names no `weight`


class NotEnoughLabels(RareMLError):
    """Too few labelled production rows for the policy: no retraining (not a failure)."""


@dataclass(frozen=True)
class Production:
    """The labelled production rows a retraining uses: to train on, and the gate set."""

    train: list[dict]  # labelled rows (`Store.labelled_records`), oldest first
    gate: list[dict]
    skipped: int  # labelled rows without the record as sent (a log of an older release): not used


def production_rows(labelled: list[dict], policy: RetrainPolicy, now: float) -> Production:
    """Split the labelled production rows by the policy; NotEnoughLabels names what is short."""
    if policy.window_days is not None:
        labelled = [r for r in labelled if r["ts"] >= now - policy.window_days * 86400]
    usable = [r for r in labelled if r["record"] is not None]
    skipped = len(labelled) - len(usable)
    if len(usable) < policy.min_new_labels:
        raise NotEnoughLabels(f"{len(usable)} labelled production rows{_window(policy)}, fewer than "
                              f"min_new_labels = {policy.min_new_labels}"
                              + (f" ({skipped} more have no record as sent)" if skipped else ""))
    usable = sorted(usable, key=lambda r: r["ts"])
    n_gate = max(1, math.ceil(policy.gate_share * len(usable)))
    train, gate = usable[:-n_gate], usable[-n_gate:]
    positives = sum(r["label"] for r in gate)
    if positives < policy.min_gate_positives or positives == len(gate):
        raise NotEnoughLabels(f"the gate set (the latest {len(gate)} labelled rows) holds {positives} positives: "
                              f"it needs at least min_gate_positives = {policy.min_gate_positives} and a negative")
    return Production(train, gate, skipped)


def _window(policy: RetrainPolicy) -> str:
    return f" in the last {policy.window_days:g} days" if policy.window_days is not None else ""


def original_training_rows(config: Config) -> pd.DataFrame:
    """The rows of the data file the champion's pipeline trained on (its split, redone), as they
    are in the file."""
    raw = load_tables(config)
    train, _, _ = split(prepare(raw, config).frame, config)
    return raw.loc[train.index].drop(columns=TEST_FLAG, errors="ignore")


def production_table(rows: list[dict], columns: list[str], config: Config, negative: object) -> pd.DataFrame:
    """Labelled production rows as rows of the data file: its columns (a field it never had is
    left out, a column the client did not send is missing), the target in the file's own values."""
    frame = pd.DataFrame.from_records([r["record"] for r in rows]).reindex(columns=columns)
    frame[config.target] = [config.positive if r["label"] == 1 else negative for r in rows]
    return frame


def negative_value(original: pd.DataFrame, config: Config) -> object:
    """How the data file writes the negative class (the target's other value)."""
    values = original[config.target].dropna().unique().tolist()
    others = [v for v in values if v != config.positive and str(v) != str(config.positive)]
    if not others:
        raise RareMLError(f"the training rows hold no negative value of '{config.target}'")
    return others[0]


def weight_column(config: Config) -> str:
    """The column of a retraining table's row weights: the config's own, else WEIGHT_COLUMN."""
    return config.weight or WEIGHT_COLUMN


def retraining_tables(config: Config, original: pd.DataFrame, production: Production) -> tuple[pd.DataFrame,
                                                                                                 pd.DataFrame]:
    """(training table, gate table), with the same columns and types, ready to write: the original
    rows with their weights (the config's, else 1) and the production ones with `production_weight`
    times their mean, in `weight_column` (the gate's all 1)."""
    weight = weight_column(config)
    columns = [c for c in original.columns if c != weight]
    negative = negative_value(original, config)
    new = production_table(production.train, columns, config, negative)
    gate = production_table(production.gate, columns, config, negative)
    base = original[weight].astype(float) if config.weight else pd.Series(1.0, index=original.index)
    table = pd.concat([original[columns].assign(**{weight: base.to_numpy()}),
                       new.assign(**{weight: config.retrain.production_weight * float(base.mean())})],
                      ignore_index=True)
    gate = gate.assign(**{weight: 1.0})
    for col in columns:  # one type per column, whatever JSON gave (Parquet holds one)
        numeric = pd.api.types.is_numeric_dtype(original[col]) and col not in config.categorical
        table[col], gate[col] = _one_type(table[col], gate[col], numeric=numeric)
    return table, gate


def _one_type(*parts: pd.Series, numeric: bool) -> list[pd.Series]:
    """Parts of one column, as numbers if the file's column is numeric and every value sent is one,
    else as level strings (how prepare reads a categorical column anyway)."""
    if numeric:
        as_numbers = [pd.to_numeric(p, errors="coerce") for p in parts]
        if all(((n.notna()) | p.isna()).all() for n, p in zip(as_numbers, parts)):
            return as_numbers
    return [category_strings(p) for p in parts]


# -- the gate ---------------------------------------------------------------------------------

def group_gaps(y: np.ndarray, decision: np.ndarray, groups: np.ndarray, n_boot: int = 0,
               seed: int = 0) -> dict[str, dict[str, float | None]]:
    """Selection-rate and true-positive-rate gaps between the groups large enough to judge (the
    live monitoring's minimum sizes), each with a 95% bootstrap interval (rows resampled as the
    gate's AP difference is: same seed, same draws); None where fewer than two groups are."""
    y, decision = np.asarray(y, float), np.asarray(decision, float)
    names, codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    known = names != "nan"

    def gaps(w: np.ndarray) -> tuple[float, float]:
        n = np.bincount(codes, weights=w, minlength=len(names))
        positives = np.bincount(codes, weights=w * y, minlength=len(names))
        selected = np.bincount(codes, weights=w * decision, minlength=len(names))
        caught = np.bincount(codes, weights=w * y * decision, minlength=len(names))
        out = []
        for enough, rate in ((known & (n >= MIN_GROUP), selected / np.maximum(n, 1)),
                             (known & (positives >= MIN_GROUP_POSITIVES), caught / np.maximum(positives, 1))):
            out.append(float(rate[enough].max() - rate[enough].min()) if enough.sum() >= 2 else math.nan)
        return out[0], out[1]

    point = gaps(np.ones(len(y)))
    rng = np.random.default_rng(seed)
    draws = np.array([gaps(np.bincount(rng.integers(0, len(y), len(y)), minlength=len(y)).astype(float))
                      for _ in range(n_boot)]).reshape(-1, 2)
    out = {}
    for i, kind in enumerate(("selection_rate", "true_positive_rate")):
        finite = draws[:, i][np.isfinite(draws[:, i])]
        low, high = np.percentile(finite, [2.5, 97.5]) if len(finite) and not math.isnan(point[i]) else (math.nan,) * 2
        out[kind] = {k: None if math.isnan(v) else float(v) for k, v in (("value", point[i]), ("low", low), ("high", high))}
    return out


def gate(y: np.ndarray, champion: np.ndarray, challenger: np.ndarray, decisions: tuple[np.ndarray, np.ndarray],
         groups: dict[str, np.ndarray], policy: RetrainPolicy, fairness_bound: float, n_boot: int = 1000,
         seed: int = 0) -> dict:
    """The decision and its evidence, from both models' calibrated scores on the gate set (and their
    decisions at their own thresholds; `groups`: each sensitive attribute's value per row)."""
    y = np.asarray(y, int)
    diff = metrics.paired_difference(y, champion, challenger, n_boot=n_boot, seed=seed)
    reasons = []
    ap = diff["average_precision_difference"]
    if not ap.value > 0:
        reasons.append(f"average precision not better ({ap.value:+.4f})")
    if not ap.low > -policy.margin:
        reasons.append(f"the 95% lower bound of the AP difference {ap.low:+.4f} is not above -margin "
                       f"({-policy.margin:g})")
    brier = diff["brier_difference"]
    if brier.value > policy.brier_tolerance:
        reasons.append(f"Brier score worse by {brier.value:.4f}, more than the tolerance {policy.brier_tolerance:g}")
    fairness = {}
    for attribute, values in groups.items():
        old, new = (group_gaps(y, d, values, n_boot, seed) for d in decisions)
        fairness[attribute] = {"champion": old, "challenger": new}
        for kind, gap in new.items():
            # evidence, not noise: its 95% interval lies above the bound (no interval: the gap itself),
            # and it is wider than the champion's
            sure = gap["low"] if gap["low"] is not None else gap["value"]
            if sure is not None and sure > fairness_bound and not gap["value"] <= (old[kind]["value"] or 0):
                reasons.append(f"{attribute}: {kind.replace('_', ' ')} gap {gap['value']:.3f} [{gap['low']:.3f}, "
                               f"{gap['high']:.3f}] above the bound {fairness_bound:g} (champion: "
                               f"{old[kind]['value'] if old[kind]['value'] is not None else float('nan'):.3f})")
    as_dict = {k: {"value": e.value, "low": e.low, "high": e.high} for k, e in diff.items()}
    return {"promote": not reasons, "reasons": reasons, "rows": len(y), "positives": int(y.sum()),
            "average_precision": {"champion": as_dict["average_precision_a"],
                                  "challenger": as_dict["average_precision_b"],
                                  "difference": as_dict["average_precision_difference"]},
            "brier": {"champion": as_dict["brier_a"], "challenger": as_dict["brier_b"],
                      "difference": as_dict["brier_difference"]},
            "fairness": fairness, "fairness_bound": fairness_bound,
            "policy": {"margin": policy.margin, "brier_tolerance": policy.brier_tolerance}, "bootstrap": n_boot}


def groups_of(records: list[dict], attributes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Each sensitive attribute's level per record ('nan' when missing), as monitoring groups them."""
    return {a: np.array([str(level_of(r.get(a))) for r in records], dtype=object) for a in attributes}


def labels(records: list[dict]) -> np.ndarray:
    return np.array([r["label"] for r in records], int)

