"""The feature schema and the one function that turns records into model input.

Training, evaluation and serving all call `to_frame`, so they cannot drift apart.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

NUMERIC, CATEGORICAL = "numeric", "categorical"


@dataclass(frozen=True)
class Feature:
    """One model input: its kind, its known levels (categorical) or training range (numeric)."""

    name: str
    kind: str
    categories: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    typical: float | str | None = None  # median or most frequent level: a form's default value
    missing_rate: float = 0.0


@dataclass(frozen=True)
class Schema:
    """What the model expects, in column order, plus the target's meaning."""

    features: tuple[Feature, ...]
    target: str
    positive: object
    sensitive: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def to_dict(self) -> dict:
        return {"target": self.target, "positive": self.positive, "sensitive": list(self.sensitive),
                "features": [asdict(f) | {"categories": list(f.categories)} for f in self.features]}

    @classmethod
    def from_dict(cls, d: Mapping) -> Schema:
        feats = tuple(Feature(**(dict(f) | {"categories": tuple(f["categories"])})) for f in d["features"])
        return cls(features=feats, target=d["target"], positive=d["positive"], sensitive=tuple(d["sensitive"]))


def _level(value: object) -> object:
    """One value as a category level: a string, integral numbers without '.0'; missing stays NaN."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return np.nan
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def category_strings(values: pd.Series) -> pd.Series:
    """Normalise a column to category-level strings (object dtype, NaN for missing)."""
    if values.dtype == object or pd.api.types.is_string_dtype(values) or pd.api.types.is_bool_dtype(values):
        return values.astype(object).map(_level)
    if pd.api.types.is_integer_dtype(values):
        return values.astype(object).where(values.notna(), np.nan).map(_level)
    return values.astype(float).map(_level)


def to_frame(data: pd.DataFrame | Iterable[Mapping], schema: Schema) -> pd.DataFrame:
    """Records or a frame -> the model's input frame: schema column order, numeric floats,
    categoricals with the training levels (a level never seen in training becomes missing)."""
    frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame.from_records(list(data))
    out = {}
    for f in schema.features:
        col = frame[f.name] if f.name in frame else pd.Series(np.nan, index=frame.index)
        if f.kind == NUMERIC:
            out[f.name] = pd.to_numeric(col, errors="coerce").astype(float)
        else:
            levels = category_strings(col)
            out[f.name] = pd.Categorical(levels.where(levels.isin(f.categories)), categories=list(f.categories))
    return pd.DataFrame(out, index=frame.index)


def unseen_levels(frame: pd.DataFrame, schema: Schema) -> dict[str, int]:
    """How many non-missing categorical values per feature are not training levels."""
    counts = {}
    for f in schema.features:
        if f.kind == CATEGORICAL and f.name in frame:
            levels = category_strings(frame[f.name])
            n = int((levels.notna() & ~levels.isin(f.categories)).sum())
            if n:
                counts[f.name] = n
    return counts
