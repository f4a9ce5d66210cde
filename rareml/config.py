"""The dataset config (TOML): the only file a user writes, read once into typed objects."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from rareml.errors import RareMLError

LARGE_ROWS, SMALL_ROWS = 50_000, 20_000
DEFAULT_FAMILIES = ("linear", "xgboost")
THRESHOLD_METRICS = ("f1", "fbeta", "mcc", "min_precision", "min_recall", "cost")


@dataclass(frozen=True)
class ThresholdPolicy:
    """How the production threshold is picked on calibrated out-of-fold scores."""

    metric: str = "f1"
    beta: float = 1.0
    min_precision: float = 0.5
    min_recall: float = 0.5
    cost_fp: float = 1.0
    cost_fn: float = 1.0


@dataclass(frozen=True)
class RetrainPolicy:
    """How a retraining (06_retrain.py) uses the labelled production rows, and how its gate judges."""

    min_new_labels: int = 200  # fewer labelled production rows than this: no retraining
    window_days: float | None = None  # only production rows of the last so many days (None: all)
    production_weight: float = 1.0  # weight of a production row against an original training row
    gate_share: float = 0.3  # the most recent share of labelled production rows: the gate set
    min_gate_positives: int = 20  # fewer positives in the gate set: no retraining (it could not judge)
    margin: float = 0.0  # promote if the 95% lower bound of AP(challenger) - AP(champion) > -margin...
    brier_tolerance: float = 0.01  # ...and the Brier score is no worse than the champion's by more
    cooldown_seconds: float = 600.0  # the watcher starts no retraining sooner after the last one
    budget_seconds: float = 420.0  # one retraining, from the log to a registered challenger (06_retrain --budget)


@dataclass(frozen=True)
class Config:
    """A validated dataset config; paths are absolute."""

    name: str
    data: Path
    target: str
    positive: object
    path: Path
    drop: tuple[str, ...] = ()
    sensitive: tuple[str, ...] = ()
    time: str | None = None
    weight: str | None = None  # a column of row weights (e.g. survey weights): used in fitting, not a feature
    test_data: Path | None = None
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    test_size: float = 0.2
    cv_folds: int | None = None  # None: 5, or 3 above LARGE_ROWS training rows
    cv_repeats: int | None = None  # None: 3 up to SMALL_ROWS training rows, else 1
    seed: int = 42
    max_categories: int = 200
    threshold: ThresholdPolicy = field(default_factory=ThresholdPolicy)
    retrain: RetrainPolicy = field(default_factory=RetrainPolicy)
    families: tuple[str, ...] = DEFAULT_FAMILIES  # [model] families: searched by 02_tune, selected or blended by 03
    refit_on_all: bool = False  # [model] refit_on_all: the served model refitted on train + test after the evaluation

    def folds_for(self, train_rows: int) -> int:
        """Stratified CV folds for tuning: as configured, else 5 (3 for large data, where each fold
        already holds thousands of positives and two fewer fits per trial buy more trials)."""
        return self.cv_folds or (3 if train_rows > LARGE_ROWS else 5)

    def repeats_for(self, train_rows: int) -> int:
        """How many times the K-fold CV is repeated with other shuffles: as configured, else 3 for
        small data, where one CV estimate is noisy enough for the search to chase noise, else 1."""
        return self.cv_repeats or (3 if train_rows <= SMALL_ROWS else 1)

    def columns_named(self) -> dict[str, str]:
        """Every column the config names, with the key that names it."""
        named = {self.target: "target"}
        if self.time:
            named[self.time] = "time"
        if self.weight:
            named[self.weight] = "weight"
        for key in ("drop", "sensitive", "categorical", "numeric"):
            for col in getattr(self, key):
                named.setdefault(col, key)
        return named


_TYPES = {
    "name": str, "data": str, "target": str, "positive": (int, str, bool), "drop": list,
    "sensitive": list, "time": str, "weight": str, "test_data": str, "categorical": list, "numeric": list, "test_size": float,
    "cv_folds": int, "cv_repeats": int, "seed": int, "max_categories": int, "threshold": dict, "retrain": dict,
    "model": dict,
}
_MODEL_TYPES = {"families": list, "refit_on_all": bool}
_THRESHOLD_TYPES = {"metric": str, "beta": float, "min_precision": float, "min_recall": float,
                    "cost_fp": float, "cost_fn": float}
_RETRAIN_TYPES = {"min_new_labels": int, "window_days": float, "production_weight": float, "gate_share": float,
                  "min_gate_positives": int, "margin": float, "brier_tolerance": float, "cooldown_seconds": float,
                  "budget_seconds": float}
_REQUIRED = ("name", "data", "target", "positive")


def _check_types(table: dict, types: dict, where: str) -> None:
    for key, value in table.items():
        if key not in types:
            raise RareMLError(f"{where}: unknown key '{key}' (known: {', '.join(types)})")
        want = types[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if want is int and isinstance(value, bool) or not isinstance(value, want):
            raise RareMLError(f"{where}: '{key}' has the wrong type ({type(value).__name__})")
        if want is list and not all(isinstance(v, str) for v in value):
            raise RareMLError(f"{where}: '{key}' must be a list of column names")


def _threshold_policy(table: dict, where: str) -> ThresholdPolicy:
    _check_types(table, _THRESHOLD_TYPES, f"{where} [threshold]")
    policy = ThresholdPolicy(**{k: (float(v) if k != "metric" else v) for k, v in table.items()})
    if policy.metric not in THRESHOLD_METRICS:
        raise RareMLError(f"{where} [threshold]: metric '{policy.metric}' is not one of "
                          f"{', '.join(THRESHOLD_METRICS)}")
    for key in ("min_precision", "min_recall"):
        if not 0 < getattr(policy, key) <= 1:
            raise RareMLError(f"{where} [threshold]: {key} must be in (0, 1]")
    if policy.beta <= 0 or policy.cost_fp < 0 or policy.cost_fn < 0 or policy.cost_fp + policy.cost_fn == 0:
        raise RareMLError(f"{where} [threshold]: beta must be > 0 and costs >= 0, not both 0")
    return policy


def _retrain_policy(table: dict, where: str) -> RetrainPolicy:
    _check_types(table, _RETRAIN_TYPES, f"{where} [retrain]")
    policy = RetrainPolicy(**{k: (float(v) if _RETRAIN_TYPES[k] is float else v) for k, v in table.items()})
    checks = {"min_new_labels": policy.min_new_labels >= 1, "min_gate_positives": policy.min_gate_positives >= 1,
              "window_days": policy.window_days is None or policy.window_days > 0,
              "production_weight": policy.production_weight > 0, "gate_share": 0 < policy.gate_share < 1,
              "margin": policy.margin >= 0, "brier_tolerance": policy.brier_tolerance >= 0,
              "cooldown_seconds": policy.cooldown_seconds >= 0, "budget_seconds": policy.budget_seconds >= 10}
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise RareMLError(f"{where} [retrain]: {bad[0]} is out of range ({getattr(policy, bad[0])}): see configs/README.md")
    return policy


def _families(table: dict, where: str) -> tuple[str, ...]:
    from rareml.families import REGISTRY

    _check_types(table, _MODEL_TYPES, f"{where} [model]")
    names = tuple(table.get("families", DEFAULT_FAMILIES))
    unknown = [n for n in names if n not in REGISTRY]
    if not names or unknown or len(set(names)) != len(names):
        raise RareMLError(f"{where} [model]: families must name each of {', '.join(REGISTRY)} at most once, "
                          f"at least one: not {list(names)}")
    return names


def load_config(path: str | Path) -> Config:
    """Read and validate a dataset config; every problem names the key."""
    path = Path(path).resolve()
    if not path.is_file():
        raise RareMLError(f"config file not found: {path}")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RareMLError(f"{path.name}: not valid TOML ({exc})") from None
    _check_types(table, _TYPES, path.name)
    missing = [k for k in _REQUIRED if k not in table]
    if missing:
        raise RareMLError(f"{path.name}: missing required key(s): {', '.join(missing)}")
    lists = {k: tuple(table.get(k, ())) for k in ("drop", "sensitive", "categorical", "numeric")}
    both = set(lists["categorical"]) & set(lists["numeric"])
    if both:
        raise RareMLError(f"{path.name}: column(s) both categorical and numeric: {', '.join(sorted(both))}")
    config = Config(
        name=table["name"], data=(path.parent / table["data"]).resolve(), target=table["target"],
        positive=table["positive"], path=path, time=table.get("time"), weight=table.get("weight"), **lists,
        test_data=(path.parent / table["test_data"]).resolve() if "test_data" in table else None,
        test_size=float(table.get("test_size", 0.2)), cv_folds=table.get("cv_folds"), cv_repeats=table.get("cv_repeats"),
        seed=table.get("seed", 42), max_categories=table.get("max_categories", 200),
        threshold=_threshold_policy(table.get("threshold", {}), path.name),
        retrain=_retrain_policy(table.get("retrain", {}), path.name),
        families=_families(table.get("model", {}), path.name),
        refit_on_all=table.get("model", {}).get("refit_on_all", False),
    )
    if not 0 < config.test_size < 1:
        raise RareMLError(f"{path.name}: test_size must be between 0 and 1")
    if config.cv_folds is not None and not 2 <= config.cv_folds <= 20:
        raise RareMLError(f"{path.name}: cv_folds must be between 2 and 20")
    if config.cv_repeats is not None and not 1 <= config.cv_repeats <= 10:
        raise RareMLError(f"{path.name}: cv_repeats must be between 1 and 10")
    if config.target in config.drop or config.target in (config.time, config.weight):
        raise RareMLError(f"{path.name}: the target '{config.target}' cannot also be dropped, the time or the weight column")
    return config
