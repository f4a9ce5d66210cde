"""The feature schema and the functions that turn data into model input.

Training and evaluation call `to_frame` on frames; the API and the GUI call `RecordEncoder` on
JSON records, which validates each value and gives the same numbers (tests hold the two equal).
"""
from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from rareml.errors import InputError

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


def level_of(value: object) -> object:
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
        return values.astype(object).map(level_of)
    if pd.api.types.is_integer_dtype(values):
        return values.astype(object).where(values.notna(), np.nan).map(level_of)
    return values.astype(float).map(level_of)


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


UNSEEN = -1.0  # a categorical value never seen in training, before the model sees it as missing


class RecordEncoder:
    """Validates JSON records against the schema and encodes them as model input rows:
    numbers as floats, categories as their position among the training levels (the codes of
    `to_frame`'s categoricals), missing (null) as NaN. Fast enough for one record per request."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self.names = schema.names
        self.codes = [{level: float(i) for i, level in enumerate(f.categories)} if f.kind == CATEGORICAL
                      else None for f in schema.features]
        self.lookups = [None if c is None else _Levels(c) for c in self.codes]
        for lookup in self.lookups:
            if lookup is not None:
                lookup[None] = math.nan
        self.categorical = np.array([f.kind == CATEGORICAL for f in schema.features])
        self.allowed = set(self.names) | set(schema.sensitive)
        self._exact = frozenset(self.names)
        self._getter = operator.itemgetter(*self.names) if len(self.names) > 1 else lambda r: (r[self.names[0]],)
        self.extras = [a for a in schema.sensitive if a not in self.names]  # recorded, not model input

    def encode(self, record: object, where: str = "") -> tuple[np.ndarray, dict[str, object]]:
        """One record -> (row with UNSEEN for unknown levels, values of the sensitive attributes
        that are not features)."""
        if not isinstance(record, dict):
            raise InputError(f"{where or 'the body '}must be a JSON object of feature values", "not_an_object")
        if len(record) > len(self.names) or not self.allowed.issuperset(record):
            extra = sorted(set(record) - self.allowed)
            if extra:
                raise InputError(f"{where}unknown field {extra[0]!r}{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}:"
                                 " GET /model lists the features", "extra_field", extra[0])
        row = np.empty(len(self.names), dtype=np.float64)
        for i, (name, codes) in enumerate(zip(self.names, self.codes)):
            try:
                value = record[name]
            except KeyError:
                raise InputError(f"{where}missing field {name!r} (send null for an unknown value)",
                                 "missing_field", name) from None
            row[i] = _number(value, name, where) if codes is None else _code(value, codes, name, where)
        return row, {a: record.get(a) for a in self.extras}

    def unseen(self, rows: np.ndarray) -> np.ndarray:
        """Where encoded rows hold a category level never seen in training."""
        return (rows == UNSEEN) & self.categorical

    def model_rows(self, rows: np.ndarray) -> np.ndarray:
        """Encoded rows as the model sees them: an unseen level is missing."""
        return np.where(self.unseen(rows), np.nan, rows)

    def encode_many(self, records: list) -> tuple[np.ndarray, list[dict[str, object]]]:
        """Many records -> rows, column by column at C speed where it can (~8x faster than `encode`
        per record); a record or value that is not plainly valid goes through the checks of
        `encode`, which name the problem."""
        names, n = self.names, len(records)
        # a list, not a generator: faster when all pass, the case worth optimising
        if not all([type(r) is dict and r.keys() == self._exact for r in records]):  # noqa: C419
            for i, record in enumerate(records):
                if type(record) is not dict or record.keys() != self._exact:
                    self.encode(record, where=f"records[{i}]: ")  # raises, or passes (sensitive extras)
        values = np.fromiter(itertools.chain.from_iterable(map(self._getter, records)), dtype=object,
                             count=n * len(names)).reshape(n, len(names))
        rows = np.empty((n, len(names)), dtype=np.float64)
        for j, (name, lookup) in enumerate(zip(names, self.lookups)):
            encoded = _fast_column(values[:, j], lookup)
            if encoded is None:  # value by value: raises for the first bad one, naming it
                encoded = [_number(v, name, f"records[{i}]: ") if lookup is None else
                           _code(v, self.codes[j], name, f"records[{i}]: ") for i, v in enumerate(values[:, j])]
            rows[:, j] = encoded
        if not self.extras:
            return rows, [{}] * n  # one shared empty dict: read, never written
        return rows, [{a: record.get(a) for a in self.extras} for record in records]


class _Levels(dict):
    """Level -> code, None -> NaN, anything else -> UNSEEN: a lookup `map` can run at C speed."""

    def __missing__(self, key: object) -> float:
        return UNSEEN


def _fast_column(column: np.ndarray, lookup: _Levels | None) -> np.ndarray | list | None:
    """A column (object array) of plainly valid values encoded at once, or None when some need a
    closer look."""
    kinds = set(map(type, column))
    if lookup is None and kinds <= {float, int, type(None)}:
        missing = np.equal(column, None)
        try:
            values = np.where(missing, math.nan, column).astype(np.float64)
        except OverflowError:
            return None
        finite = np.abs(values) <= FLOAT32_MAX  # False for NaN, inf and what float32 cannot hold
        return values if finite.sum() + missing.sum() == len(values) else None
    if lookup is not None and kinds <= {str, type(None)}:
        return list(map(lookup.__getitem__, column))
    return None


FLOAT32_MAX = float(np.finfo(np.float32).max)  # XGBoost reads input as float32: beyond this it is infinite


def _number(value: object, name: str, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}field {name!r} must be a number or null, got {type(value).__name__}",
                         "wrong_type", name)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise InputError(f"{where}field {name!r} must be finite (send null for an unknown value)", "non_finite", name)
    if abs(number) > FLOAT32_MAX:
        raise InputError(f"{where}field {name!r} is out of range: the model reads numbers as 32-bit floats "
                         f"(at most {FLOAT32_MAX:.4g} in size)", "out_of_range", name)
    return number


def _code(value: object, codes: dict[str, float], name: str, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, str):
        return codes.get(value, UNSEEN)
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{where}field {name!r} must be finite (send null for an unknown value)", "non_finite", name)
    if not isinstance(value, (int, float, bool)):
        raise InputError(f"{where}field {name!r} must be a string, number or null, got {type(value).__name__}",
                         "wrong_type", name)
    return codes.get(level_of(value), UNSEEN)


def to_records(frame: pd.DataFrame, schema: Schema) -> list[dict]:
    """Rows of a prepared frame as the JSON records the API takes (features and sensitive
    attributes; missing as None): what the simulator, the GUI's examples and the tests send."""
    columns = list(dict.fromkeys(schema.names + list(schema.sensitive)))
    subset = frame[columns].astype(object)
    return [{k: (None if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else
                 v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
            for row in subset.to_dict(orient="records")]
