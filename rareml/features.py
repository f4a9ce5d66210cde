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
    ignored: tuple[str, ...] = ()  # table columns the pipeline removed (dropped, target, time): a row may hold them

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def to_dict(self) -> dict:
        return {"target": self.target, "positive": self.positive, "sensitive": list(self.sensitive),
                "ignored": list(self.ignored),
                "features": [asdict(f) | {"categories": list(f.categories)} for f in self.features]}

    @classmethod
    def from_dict(cls, d: Mapping) -> Schema:
        """The schema from `to_dict`'s form; a model folder written before `ignored` existed has none."""
        feats = tuple(Feature(**(dict(f) | {"categories": tuple(f["categories"])})) for f in d["features"])
        return cls(features=feats, target=d["target"], positive=d["positive"], sensitive=tuple(d["sensitive"]),
                   ignored=tuple(d.get("ignored", ())))


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


def frame_rows(frame: pd.DataFrame) -> np.ndarray:
    """`to_frame`'s frame as the encoded rows the API scores (`RecordEncoder.model_rows`): numbers as
    floats, a category as its position among the training levels, NaN for missing."""
    columns = []
    for name in frame.columns:
        col = frame[name]
        if col.dtype == "category":
            codes = col.cat.codes.to_numpy(np.float64)
            columns.append(np.where(codes < 0, np.nan, codes))
        else:
            columns.append(col.to_numpy(np.float64))
    return np.column_stack(columns) if columns else np.empty((len(frame), 0))


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
    `to_frame`'s categoricals), missing (null) as NaN. Fast enough for one record per request.
    A raw row of the training table is accepted: the columns the pipeline removed (`schema.ignored`)
    are dropped unread; `ignored_fields` and `ignored_counts` say which ones a request carried."""

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
        self._numeric = np.flatnonzero(~self.categorical)
        self.allowed = set(self.names) | set(schema.sensitive)
        self.ignored = frozenset(schema.ignored) - self.allowed  # a feature or sensitive attribute stays one
        self.allowed |= self.ignored
        self._exact = frozenset(self.names)
        self._getter = operator.itemgetter(*self.names) if len(self.names) > 1 else lambda r: (r[self.names[0]],)
        self.extras = [a for a in schema.sensitive if a not in self.names]  # recorded, not model input

    def encode(self, record: object, where: str = "") -> tuple[np.ndarray, dict[str, object]]:
        """One record -> (row with UNSEEN for unknown levels, values of the sensitive attributes
        that are not features)."""
        if not isinstance(record, dict):
            raise InputError(f"{where or 'the body '}must be a JSON object of feature values", "not_an_object")
        if not self.allowed.issuperset(record):  # a feature, a sensitive attribute or an ignored column
            extra = sorted(set(record) - self.allowed)
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

    def ignored_fields(self, record: dict) -> list[str]:
        """The ignored fields (`schema.ignored`) an accepted record carried, sorted: for a metric. A
        record with no more keys than features has none, and costs one length check."""
        if len(record) <= len(self.names) or not self.ignored:
            return []
        return sorted(self.ignored.intersection(record))

    def ignored_counts(self, sent: dict | list) -> dict[str, int]:
        """Per ignored field, how many rows of an accepted body carried it, for a metric: one record,
        a list of records (`encode_many`) or columns (`encode_columns`; told from a record by its
        lists, which no accepted record holds for a feature)."""
        if not self.ignored:
            return {}
        if isinstance(sent, dict):
            if len(sent) <= len(self.names):  # the features and nothing else, in either form
                return {}
            if type(sent.get(self.names[0])) is not list:  # one record
                return dict.fromkeys(sorted(self.ignored.intersection(sent)), 1)
            return {name: len(sent[name]) for name in sorted(self.ignored.intersection(sent))}
        n = len(self.names)
        wide = [r for r in sent if len(r) > n]  # the others hold exactly the features
        counts = {name: sum(map(operator.contains, wide, itertools.repeat(name, len(wide)))) for name in
                  sorted(self.ignored)} if wide else {}
        return {name: c for name, c in counts.items() if c}

    def unseen(self, rows: np.ndarray) -> np.ndarray:
        """Where encoded rows hold a category level never seen in training."""
        return (rows == UNSEEN) & self.categorical

    def model_rows(self, rows: np.ndarray) -> np.ndarray:
        """Encoded rows as the model sees them: an unseen level is missing."""
        return np.where(self.unseen(rows), np.nan, rows)

    def encode_many(self, records: list) -> tuple[np.ndarray, list[dict[str, object]]]:
        """Many records -> rows, at C speed where it can (~15x faster than `encode` per record); a
        record or value that is not plainly valid goes through the checks of `encode`, which name
        the problem."""
        names, n = self.names, len(records)
        try:  # the right number of fields, all of them present: exactly the features
            if not all([type(r) is dict and len(r) == len(names) for r in records]):  # noqa: C419 (a list is faster)
                raise KeyError
            columns = list(zip(*map(self._getter, records)))  # one tuple of values per feature
        except KeyError:  # some record has other keys: all the features and only allowed ones, or `encode` names it
            exact, allowed = self._exact, self.allowed
            for i, record in enumerate(records):
                if type(record) is not dict or not (record.keys() >= exact and allowed.issuperset(record)):
                    self.encode(record, where=f"records[{i}]: ")  # raises
            columns = list(zip(*map(self._getter, records)))
        rows = self._encode_columns(columns, n, "records[{}]: ")
        if not self.extras:
            return rows, [{}] * n  # one shared empty dict: read, never written
        return rows, [{a: record.get(a) for a in self.extras} for record in records]

    def column_length(self, columns: object) -> int:
        """The number of rows of a batch given column by column, {"feature": [values, ...], ...}
        (what pandas' `to_dict("list")` gives), after checking its shape."""
        if not isinstance(columns, dict):
            raise InputError('"columns" must be an object of feature -> list of values', "not_columns", "columns")
        extra = sorted(set(columns) - self.allowed)
        if extra:
            raise InputError(f"unknown column {extra[0]!r}: GET /model lists the features", "extra_field", extra[0])
        for name in self.names:
            if name not in columns:
                raise InputError(f"missing column {name!r} (send nulls for unknown values)", "missing_field", name)
        lengths = {}
        for name, values in columns.items():
            if type(values) is not list:
                raise InputError(f"column {name!r} must be a list of values", "not_a_list", name)
            lengths.setdefault(len(values), name)
        if len(lengths) > 1:
            (n1, a), (n2, b) = list(lengths.items())[:2]
            raise InputError(f"columns differ in length: {a!r} has {n1} values, {b!r} {n2}", "ragged_columns", b)
        return next(iter(lengths))

    def encode_columns(self, columns: object) -> tuple[np.ndarray, list[dict[str, object]]]:
        """A batch given column by column -> rows, as `encode_many` gives for the same records.
        Half the bytes of records and no object per record: the fast way to send many rows."""
        n = self.column_length(columns)
        rows = self._encode_columns([columns[name] for name in self.names], n, "row {} of the columns: ")
        if not self.extras:
            return rows, [{}] * n
        return rows, [dict(zip(self.extras, values))
                      for values in zip(*(columns.get(a, [None] * n) for a in self.extras))]

    def _encode_columns(self, columns: list, n: int, where: str) -> np.ndarray:
        """Columns of values (one sequence per feature, schema order) -> rows: the numeric block
        at once, each categorical column by a lookup; a column with a value that is not plainly
        valid goes value by value, and the first bad one raises, naming its row (`where`)."""
        rows = np.empty((n, len(self.names)), dtype=np.float64)
        if n == 0:
            return rows
        block = _numeric_block([columns[j] for j in self._numeric]) if len(self._numeric) else None
        if block is not None:
            rows[:, self._numeric] = block.T
        for j, (name, lookup) in enumerate(zip(self.names, self.lookups)):
            if lookup is None and block is not None:
                continue
            try:
                if lookup is None:
                    raise _NeedsCheck
                rows[:, j] = np.fromiter(map(lookup.__getitem__, columns[j]), np.float64, n)
            except (_NeedsCheck, TypeError):  # unhashable, or value by value
                rows[:, j] = [_number(v, name, where.format(i)) if lookup is None else
                              _code(v, self.codes[j], name, where.format(i)) for i, v in enumerate(columns[j])]
        return rows


class _NeedsCheck(Exception):
    """A value the fast path cannot take as it is (a number for a category, a bad value)."""


class _Levels(dict):
    """Level -> code, None -> NaN, an unknown string -> UNSEEN: a lookup `map` can run at C speed.
    Anything else (numbers, booleans, lists) is left to `_code`."""

    def __missing__(self, key: object) -> float:
        if type(key) is str:
            return UNSEEN
        raise _NeedsCheck


def _numeric_block(columns: list[tuple]) -> np.ndarray | None:
    """Numeric columns (features x records) as floats at once, None (missing) as NaN; None when
    some value needs a closer look (wrong type, NaN, inf, beyond float32)."""
    if not set(map(type, itertools.chain.from_iterable(columns))) <= {float, int, type(None)}:
        return None
    try:
        block = np.array(columns, dtype=np.float64)
    except OverflowError:
        return None
    finite = int(np.count_nonzero(np.abs(block) <= FLOAT32_MAX))  # NaN, inf and what float32 cannot hold fail
    return block if finite + sum(c.count(None) for c in columns) == block.size else None


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
