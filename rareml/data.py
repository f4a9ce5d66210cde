"""Loading, validating and splitting a dataset; the schema and reference statistics of training data."""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from rareml.config import Config
from rareml.errors import RareMLError
from rareml.features import CATEGORICAL, NUMERIC, Feature, Schema, category_strings

log = logging.getLogger(__name__)
LABEL = "_label"  # the target as 0/1 in the prepared splits
TEST_FLAG = "_is_test"  # marks the rows of a separate test file (config `test_data`)
WEIGHT = "_weight"  # row weights in the prepared splits (config `weight`), when there are any


@dataclass
class Prepared:
    """A validated dataset: the frame with a 0/1 `_label` column, the feature kinds, what was dropped,
    and the table's columns that are neither feature nor sensitive attribute (dropped, target, time),
    in table order: a record with them is still a row of this table (`Schema.ignored`)."""

    frame: pd.DataFrame
    kinds: dict[str, str]
    dropped: dict[str, str]
    ignored: tuple[str, ...] = ()


def frame_fingerprint(frame: pd.DataFrame) -> str:
    """A hash of the rows (index and values), stable across runs and file formats."""
    return hashlib.sha256(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes()).hexdigest()[:16]


def load_table(path: Path) -> pd.DataFrame:
    """Read a .csv, .csv.gz or .parquet file; any failure is one clear line."""
    if not path.is_file():
        raise RareMLError(f"data file not found: {path}")
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            frame = pd.read_parquet(path)
        elif name.endswith((".csv", ".csv.gz")):
            frame = pd.read_csv(path, low_memory=False)
        else:
            raise RareMLError(f"{path.name}: unsupported format (use .csv, .csv.gz or .parquet)")
    except RareMLError:
        raise
    except Exception as exc:  # noqa: BLE001 (any parser's failure on a user's file is a user error)
        raise RareMLError(f"{path.name}: cannot read it as {path.suffix} ({type(exc).__name__}: {exc})") from None
    if frame.empty:
        raise RareMLError(f"{path.name}: no rows")
    return frame


def load_tables(config: Config) -> pd.DataFrame:
    """The data file, with the rows of the separate test file (if any) appended and flagged."""
    frame = load_table(config.data)
    if config.test_data is None:
        return frame
    test = load_table(config.test_data)
    if list(test.columns) != list(frame.columns):
        differ = sorted(set(test.columns) ^ set(frame.columns)) or ["(column order)"]
        raise RareMLError(f"{config.test_data.name} and {config.data.name} have different columns: "
                          + ", ".join(differ[:10]))
    return pd.concat([frame.assign(**{TEST_FLAG: False}), test.assign(**{TEST_FLAG: True})], ignore_index=True)


def _label(frame: pd.DataFrame, config: Config) -> pd.Series:
    target = frame[config.target]
    values = target.dropna().unique()
    if len(values) != 2:
        shown = ", ".join(map(repr, values[:5].tolist()))
        raise RareMLError(f"target '{config.target}' is not binary: {len(values)} distinct values ({shown})")
    is_pos = target == config.positive
    if not is_pos.any():
        is_pos = target.astype(str) == str(config.positive)
    if not is_pos.any():
        raise RareMLError(f"positive label {config.positive!r} not found in target '{config.target}' "
                          f"(its values: {', '.join(map(repr, values.tolist()))})")
    return is_pos.astype("int8")


def _kind(frame: pd.DataFrame, col: str, config: Config) -> str:
    if col in config.categorical:
        return CATEGORICAL
    values = frame[col]
    if col in config.numeric and not pd.api.types.is_numeric_dtype(values):
        coerced = pd.to_numeric(values, errors="coerce")
        bad = values[coerced.isna() & values.notna()]
        if len(bad):
            raise RareMLError(f"column '{col}' is listed as numeric but holds {bad.iloc[0]!r}")
        frame[col] = coerced
        return NUMERIC
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    return NUMERIC if numeric or col in config.numeric else CATEGORICAL


def prepare(frame: pd.DataFrame, config: Config) -> Prepared:
    """Validate the frame against the config; label the target; drop useless columns (with a warning)."""
    absent = {c: k for c, k in config.columns_named().items() if c not in frame.columns}
    if absent:
        raise RareMLError("config names column(s) absent from the data: "
                          + ", ".join(f"'{c}' ({k})" for c, k in absent.items()))
    missing_target = frame[config.target].isna()
    if missing_target.any():
        log.warning("dropping %d rows with a missing target", int(missing_target.sum()))
        frame = frame.loc[~missing_target]
    frame = frame.copy()
    frame[LABEL] = _label(frame, config)
    if config.weight:
        frame[WEIGHT] = _weights(frame[config.weight], config.weight)
    dropped = {c: "config drop" for c in config.drop}
    kinds = {}
    for col in frame.columns:
        if col in (config.target, LABEL, TEST_FLAG, WEIGHT, config.time, config.weight) or col in dropped:
            continue
        if frame[col].isna().all():
            dropped[col] = "all values missing"
        elif frame[col].nunique(dropna=False) <= 1:
            dropped[col] = "constant"
        else:
            kinds[col] = _kind(frame, col, config)
            if kinds[col] == CATEGORICAL:
                frame[col] = category_strings(frame[col])
    for col, why in dropped.items():
        if why != "config drop":
            log.warning("dropping column '%s': %s", col, why)
    if not kinds:
        raise RareMLError("no usable feature columns left after dropping")
    keep = list(kinds) + [c for c in config.sensitive if c not in kinds] + [config.target, LABEL]
    keep += [c for c in (config.time, WEIGHT, TEST_FLAG) if c and c in frame]
    removed = set(dropped) | {config.target, config.time, config.weight}
    ignored = tuple(c for c in frame.columns if c in removed and c not in kinds and c not in config.sensitive)
    return Prepared(frame=frame[list(dict.fromkeys(keep))], kinds=kinds, dropped=dropped, ignored=ignored)


def _weights(values: pd.Series, name: str) -> pd.Series:
    """The `weight` column as float64: numbers >= 0, none missing, not all zero."""
    weights = pd.to_numeric(values, errors="coerce")
    bad = values[weights.isna() | ~np.isfinite(weights) | (weights < 0)]
    if len(bad):
        raise RareMLError(f"weight column '{name}' holds {bad.iloc[0]!r}: weights must be finite numbers >= 0")
    if not (weights > 0).any():
        raise RareMLError(f"weight column '{name}' is zero everywhere")
    return weights.astype("float64")


def weights_of(frame: pd.DataFrame) -> np.ndarray | None:
    """A prepared split's row weights, or None when the config gives none."""
    return frame[WEIGHT].to_numpy(dtype=float) if WEIGHT in frame else None


def split(frame: pd.DataFrame, config: Config) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Hold out the test set: the rows of `test_data` if given, else the latest period when `time`
    is set, else a stratified share."""
    if TEST_FLAG in frame:
        is_test = frame[TEST_FLAG].to_numpy(dtype=bool)
        train, test = frame.loc[~is_test].drop(columns=TEST_FLAG), frame.loc[is_test].drop(columns=TEST_FLAG)
        how = f"separate test file: {config.test_data.name}"
    elif config.time:
        periods = frame[config.time].dropna().unique()
        if len(periods) < 2:
            raise RareMLError(f"time column '{config.time}' has fewer than two periods: cannot split by time")
        latest = max(periods)
        is_test = (frame[config.time] == latest).to_numpy()
        train, test, how = frame.loc[~is_test], frame.loc[is_test], f"time: test = {config.time} {latest}"
    else:
        train, test = train_test_split(frame, test_size=config.test_size, stratify=frame[LABEL],
                                       random_state=config.seed)
        how = f"stratified random: test = {config.test_size:.0%}"
    n_pos, folds = int(train[LABEL].sum()), config.folds_for(len(train))
    if n_pos < folds:
        raise RareMLError(f"only {n_pos} positive(s) in the training split, fewer than cv_folds = {folds}")
    if test[LABEL].sum() == 0 or (train[LABEL] == 0).sum() < folds:
        raise RareMLError("the split leaves no positives in the test set or too few negatives to train")
    return train, test, how


def infer_schema(train: pd.DataFrame, kinds: dict[str, str], config: Config, ignored: Iterable[str] = ()) -> Schema:
    """The schema from the training split only (levels and ranges never look at the test set);
    `ignored`: the columns a record may carry unused (`Prepared.ignored`)."""
    feats = []
    for col, kind in kinds.items():
        values = train[col]
        missing = float(values.isna().mean())
        if kind == NUMERIC:
            v = values.dropna().astype(float)
            feats.append(Feature(col, NUMERIC, min=float(v.min()), max=float(v.max()),
                                 typical=float(v.median()), missing_rate=missing))
            continue
        counts = values.value_counts()
        if len(counts) > config.max_categories:
            log.warning("column '%s' has %d levels: keeping the %d most frequent, the rest count as unseen",
                        col, len(counts), config.max_categories)
        levels = sorted(counts.index[: config.max_categories])
        feats.append(Feature(col, CATEGORICAL, categories=tuple(levels), typical=str(counts.index[0]),
                             missing_rate=missing))
    return Schema(features=tuple(feats), target=config.target, positive=config.positive,
                  sensitive=config.sensitive, ignored=tuple(ignored))


def numeric_reference(values: np.ndarray, bins: int = 10) -> dict:
    """Shares of values in quantile bins (edges from these values; a bin is (e[i-1], e[i]]) and missing."""
    finite = values[~np.isnan(values)]
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, finite, side="left"), minlength=len(edges) + 1)
    return {"kind": NUMERIC, "edges": edges.tolist(), "shares": (counts / len(values)).tolist(),
            "missing": float(1 - len(finite) / len(values))}


def reference_stats(train: pd.DataFrame, schema: Schema, bins: int = 10) -> dict:
    """Per-feature distribution of the training data, the baseline for drift (PSI) in production."""
    ref = {}
    for f in schema.features:
        values = train[f.name]
        if f.kind == NUMERIC:
            ref[f.name] = numeric_reference(values.to_numpy(dtype=float), bins)
        else:
            missing = float(values.isna().mean())
            shares = values.value_counts(dropna=True) / len(values)
            ref[f.name] = {"kind": CATEGORICAL, "shares": {k: float(shares.get(k, 0.0)) for k in f.categories},
                           "other": float(1 - missing - shares.reindex(list(f.categories)).fillna(0).sum()),
                           "missing": missing}
    return ref


def split_warnings(train: pd.DataFrame, test: pd.DataFrame, kinds: dict[str, str]) -> list[str]:
    """Columns whose coding changes between the splits (all missing or a single value on one side only):
    a model would learn a pattern the test period, and production, never shows."""
    found = []
    for col in kinds:
        a, b = train[col], test[col]
        if a.isna().mean() - b.isna().mean() > 0.5 or b.isna().mean() - a.isna().mean() > 0.5:
            found.append(f"'{col}' is missing in {a.isna().mean():.0%} of training rows but {b.isna().mean():.0%} of test rows")
        elif (a.nunique() <= 1) != (b.nunique() <= 1):
            found.append(f"'{col}' has {a.nunique()} value(s) in training but {b.nunique()} in test")
    return found
