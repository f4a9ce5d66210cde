"""RecordEncoder (the API's per-record path) against to_frame (the training path): same numbers for
any valid record, and one precise InputError for each kind of bad one."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rareml.errors import InputError
from rareml.features import CATEGORICAL, NUMERIC, UNSEEN, Feature, RecordEncoder, Schema, to_frame

SCHEMA = Schema(
    features=(Feature("age", NUMERIC, min=0, max=90), Feature("code", CATEGORICAL, categories=("1", "10", "2", "7.5")),
              Feature("income", NUMERIC), Feature("job", CATEGORICAL, categories=("clerk", "manager", "true"))),
    target="y", positive=1, sensitive=("sex", "job"))  # sex: recorded beside the row; job: a feature
ENCODER = RecordEncoder(SCHEMA)
NUMERIC_NAMES = [f.name for f in SCHEMA.features if f.kind == NUMERIC]
CATEGORICAL_NAMES = [f.name for f in SCHEMA.features if f.kind == CATEGORICAL]


def valid() -> dict:
    return {"age": 31, "code": "10", "income": 1234.5, "job": "clerk"}


def frame_codes(records: list[dict]) -> np.ndarray:
    """The training path: to_frame, categoricals replaced by their codes, NaN for missing or unseen."""
    frame = to_frame(pd.DataFrame.from_records(records), SCHEMA)
    return np.column_stack([frame[c].cat.codes.astype(float).where(frame[c].notna()).to_numpy()
                            if frame[c].dtype == "category" else frame[c].to_numpy(dtype=float) for c in frame])


F32 = float(np.finfo(np.float32).max)  # beyond it the encoder refuses a number (XGBoost reads float32)
numbers = st.one_of(st.none(), st.integers(-(2**53), 2**53), st.floats(-F32, F32),
                    st.sampled_from([0, -0.0, 3e38, -1e-308, 5e-324, -2, -1, -0.5]))
levels = st.one_of(
    st.none(),
    st.sampled_from(["1", "10", "2", "7.5", "clerk", "manager", "true"]),  # known (in one feature or the other)
    st.sampled_from(["01", "1.0", "10.0", " 1", "Clerk", "", "3", "false", "nan", "None", "7.50"]),  # unseen strings
    st.text(max_size=5),
    st.sampled_from([1, 10, 2, 3, 0, -1, 1.0, 10.0, 7.5, 2.5, -0.0, 1e20, True, False]),  # numbers for numeric-looking levels
    st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False))
sexes = st.one_of(st.none(), st.sampled_from(["F", "M", "x"]), st.integers(0, 3))


@st.composite
def records(draw) -> dict:
    record = {name: draw(numbers) for name in NUMERIC_NAMES} | {name: draw(levels) for name in CATEGORICAL_NAMES}
    if draw(st.booleans()):
        record["sex"] = draw(sexes)
    keys = draw(st.permutations(list(record)))  # key order must not matter
    return {k: record[k] for k in keys}


@settings(max_examples=300, deadline=None)
@given(st.lists(records(), min_size=1, max_size=6))
def test_encoder_gives_the_numbers_of_the_training_path(batch):
    rows, extras = ENCODER.encode_many(batch)
    assert rows.shape == (len(batch), len(SCHEMA.features)) and rows.dtype == np.float64
    expected = frame_codes(batch)
    np.testing.assert_array_equal(ENCODER.model_rows(rows), expected)
    # UNSEEN marks exactly the values that are present but not a training level
    present = np.array([[r[f.name] is not None for f in SCHEMA.features] for r in batch])
    is_cat = np.array([f.kind == CATEGORICAL for f in SCHEMA.features])
    np.testing.assert_array_equal(ENCODER.unseen(rows), present & is_cat & np.isnan(expected))
    np.testing.assert_array_equal(ENCODER.unseen(rows), (rows == UNSEEN) & is_cat)
    assert extras == [{"sex": r.get("sex")} for r in batch]
    for record, row in zip(batch, rows):
        one, extra = ENCODER.encode(record)
        np.testing.assert_array_equal(one, row)
        assert extra == {"sex": record.get("sex")}
    # the same batch sent column by column gives the same rows (sex: a column only if some record has it)
    names = ENCODER.names + (["sex"] if any("sex" in r for r in batch) else [])
    by_column, column_extras = ENCODER.encode_columns({name: [r.get(name) for r in batch] for name in names})
    np.testing.assert_array_equal(by_column, rows)
    assert column_extras == extras


@pytest.mark.parametrize(("value", "code"), [("1", 0), (1, 0), (1.0, 0), ("10", 1), (10, 1), (10.0, 1), (2, 2),
                                             ("7.5", 3), (7.5, 3), (None, math.nan), ("01", UNSEEN), ("1.0", UNSEEN),
                                             (3, UNSEEN), (2.5, UNSEEN), (True, UNSEEN), (10**400, UNSEEN)])
def test_numeric_looking_levels(value, code):
    row, _ = ENCODER.encode(valid() | {"code": value})
    np.testing.assert_array_equal(row[1], code)


@pytest.mark.parametrize("value", [-1, -1.0])
def test_a_numeric_minus_one_is_a_number_not_missing(value):
    record = valid() | {"income": value}
    row, _ = ENCODER.encode(record)
    assert row[2] == -1.0
    np.testing.assert_array_equal(ENCODER.model_rows(row[None]), frame_codes([record]))


def test_a_bool_is_its_lowercase_level_as_in_training():
    row, _ = ENCODER.encode(valid() | {"job": True})
    assert row[3] == 2.0  # "true"
    assert to_frame([valid() | {"job": True}], SCHEMA)["job"].cat.codes[0] == 2


def test_sensitive_attribute_beside_the_features_is_allowed_and_returned():
    row, extras = ENCODER.encode(valid() | {"sex": "F"})
    assert extras == {"sex": "F"}
    np.testing.assert_array_equal(row, [31, 1, 1234.5, 0])
    assert ENCODER.encode(valid())[1] == {"sex": None}  # optional
    assert RecordEncoder(Schema(SCHEMA.features, "y", 1)).encode(valid())[1] == {}


BAD = [
    ("missing numeric", lambda r: r.pop("age"), "missing_field", "age"),
    ("missing categorical", lambda r: r.pop("job"), "missing_field", "job"),
    ("extra field", lambda r: r.update(height=180), "extra_field", "height"),
    ("extra field among sensitive", lambda r: r.update(sex="F", zzz=1), "extra_field", "zzz"),
    ("target is not an input", lambda r: r.update(y=1), "extra_field", "y"),
    ("string for numeric", lambda r: r.update(age="31"), "wrong_type", "age"),
    ("bool for numeric", lambda r: r.update(income=True), "wrong_type", "income"),
    ("list for numeric", lambda r: r.update(age=[31]), "wrong_type", "age"),
    ("dict for numeric", lambda r: r.update(income={"v": 1}), "wrong_type", "income"),
    ("list for categorical", lambda r: r.update(code=["1"]), "wrong_type", "code"),
    ("dict for categorical", lambda r: r.update(job={"name": "clerk"}), "wrong_type", "job"),
    ("NaN numeric", lambda r: r.update(age=math.nan), "non_finite", "age"),
    ("inf numeric", lambda r: r.update(income=math.inf), "non_finite", "income"),
    ("-inf numeric", lambda r: r.update(income=-math.inf), "non_finite", "income"),
    ("NaN categorical", lambda r: r.update(code=math.nan), "non_finite", "code"),
    ("inf categorical", lambda r: r.update(code=math.inf), "non_finite", "code"),
    ("huge int numeric", lambda r: r.update(age=10**400), "non_finite", "age"),
    ("huge negative int numeric", lambda r: r.update(income=-(10**400)), "non_finite", "income"),
]


@pytest.mark.parametrize(("mutate", "reason", "field"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_records_are_refused_with_the_field_and_reason(mutate, reason, field):
    record = valid()
    mutate(record)
    with pytest.raises(InputError) as caught:
        ENCODER.encode(record)
    assert (caught.value.reason, caught.value.field) == (reason, field)
    assert repr(field) in str(caught.value) and not str(caught.value).startswith("records[")


@pytest.mark.parametrize("record", [[], "text", 3, None, ["age", 31]])
def test_a_record_must_be_an_object(record):
    with pytest.raises(InputError) as caught:
        ENCODER.encode(record)
    assert caught.value.reason == "not_an_object" and caught.value.field is None


def test_several_extra_fields_name_the_first_and_count_the_rest():
    with pytest.raises(InputError, match=r"unknown field 'a' \(and 2 more\)") as caught:
        ENCODER.encode(valid() | {"c": 1, "a": 1, "b": 1})
    assert caught.value.field == "a"




@pytest.mark.parametrize(("mutate", "reason", "field"),
                         [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_batch_errors_name_the_record(mutate, reason, field):
    bad = valid()
    mutate(bad)
    with pytest.raises(InputError) as caught:
        ENCODER.encode_many([valid(), valid(), bad, valid()])
    assert str(caught.value).startswith("records[2]: ")
    assert (caught.value.reason, caught.value.field) == (reason, field)


BAD_VALUES = [b for b in BAD if b[2] not in ("extra_field", "missing_field")]  # what a column can hold


@pytest.mark.parametrize(("mutate", "reason", "field"), [b[1:] for b in BAD_VALUES], ids=[b[0] for b in BAD_VALUES])
def test_bad_values_in_columns_name_the_row(mutate, reason, field):
    bad = valid()
    mutate(bad)
    batch = [valid(), valid(), bad]
    with pytest.raises(InputError) as caught:
        ENCODER.encode_columns({name: [r.get(name) for r in batch] for name in ENCODER.names})
    assert str(caught.value).startswith("row 2 of the columns: ")
    assert (caught.value.reason, caught.value.field) == (reason, field)


@pytest.mark.parametrize(("columns", "reason", "field"), [
    ([[31]], "not_columns", "columns"),
    ({"age": [31], "code": ["1"], "income": [1.0]}, "missing_field", "job"),
    ({"age": [31], "code": ["1"], "income": [1.0], "job": ["clerk"], "zip": [1]}, "extra_field", "zip"),
    ({"age": 31, "code": ["1"], "income": [1.0], "job": ["clerk"]}, "not_a_list", "age"),
    ({"age": [31, 32], "code": ["1"], "income": [1.0, 2.0], "job": ["clerk", None]}, "ragged_columns", "code"),
    ({"age": [31], "code": ["1"], "income": [1.0], "job": ["clerk"], "sex": []}, "ragged_columns", "sex"),
])
def test_badly_shaped_columns_are_refused(columns, reason, field):
    with pytest.raises(InputError) as caught:
        ENCODER.encode_columns(columns)
    assert (caught.value.reason, caught.value.field) == (reason, field)
    assert repr(field) in str(caught.value) or field == "columns"


def test_batch_with_a_non_object_names_the_record():
    with pytest.raises(InputError) as caught:
        ENCODER.encode_many([valid(), "x"])
    assert str(caught.value).startswith("records[1]") and caught.value.reason == "not_an_object"


def test_empty_batch_is_an_empty_matrix():
    rows, extras = ENCODER.encode_many([])
    assert rows.shape == (0, len(SCHEMA.features)) and extras == []


# A raw row of the user's table: the columns the pipeline removed (config `drop`, constant or all
# missing, the target, the time column) are accepted and unread. "sex" is both sensitive and listed
# as ignored: it stays sensitive; "job" is a feature listed as ignored: it stays a feature.
RAW = Schema(SCHEMA.features, "y", 1, sensitive=("sex", "job"), ignored=("weight", "const", "y", "year", "sex", "job"))
RAW_ENCODER = RecordEncoder(RAW)
REMOVED = {"weight": 2.5, "const": {"any": ["value"]}, "y": 1, "year": math.nan}  # never read: never checked


def test_a_raw_row_is_accepted_and_encodes_as_without_its_removed_columns():
    for sent in (valid(), valid() | {"sex": "F"}):
        row, extras = RAW_ENCODER.encode(sent | REMOVED)
        expected, expected_extras = ENCODER.encode(sent)
        np.testing.assert_array_equal(row, expected)
        assert extras == expected_extras == {"sex": sent.get("sex")}  # sensitive wins over ignored
    assert RAW_ENCODER.ignored == {"weight", "const", "y", "year"}
    assert RAW_ENCODER.ignored_fields(valid() | REMOVED) == ["const", "weight", "y", "year"]
    assert RAW_ENCODER.ignored_fields(valid() | {"sex": "F", "y": 0}) == ["y"]
    assert RAW_ENCODER.ignored_fields(valid()) == [] and ENCODER.ignored_fields(valid() | {"sex": "F"}) == []
    assert RAW_ENCODER.ignored_counts(valid() | REMOVED) == {"const": 1, "weight": 1, "y": 1, "year": 1}
    assert RAW_ENCODER.ignored_counts(valid() | {"sex": "F"}) == {} == ENCODER.ignored_counts(valid() | {"sex": "F"})


def test_a_removed_column_does_not_stand_for_a_feature():
    record = valid() | REMOVED
    del record["job"]  # listed as ignored, but a feature: still required
    with pytest.raises(InputError) as caught:
        RAW_ENCODER.encode(record)
    assert (caught.value.reason, caught.value.field) == ("missing_field", "job")


@pytest.mark.parametrize("unknown", [{"height": 180}, {"height": 180, "y": 1}, {"y": 1, "weight": 1, "zzz": 0}])
def test_a_field_the_table_never_had_is_still_refused_by_name(unknown):
    field = next(k for k in unknown if k not in RAW.ignored)
    for encode in (RAW_ENCODER.encode, lambda r: RAW_ENCODER.encode_many([valid(), r])):
        with pytest.raises(InputError) as caught:
            encode(valid() | unknown)
        assert (caught.value.reason, caught.value.field) == ("extra_field", field)
        assert f"unknown field {field!r}" in str(caught.value)
    with pytest.raises(InputError) as caught:
        RAW_ENCODER.encode_columns({k: [v] for k, v in (valid() | unknown).items()})
    assert (caught.value.reason, caught.value.field) == ("extra_field", field)
    with pytest.raises(InputError):  # without `ignored` (a model folder from before), a removed column is unknown
        ENCODER.encode(valid() | {"y": 1})


def test_batches_of_raw_rows_encode_as_without_their_removed_columns():
    batch = [valid(), valid() | {"age": None, "code": 7.5, "sex": "M"}, valid() | {"job": "manager", "income": -3}]
    raw = [batch[0] | REMOVED, batch[1] | {"y": 0}, batch[2]]  # some records carry removed columns, some not
    rows, extras = RAW_ENCODER.encode_many(raw)
    expected, expected_extras = ENCODER.encode_many(batch)
    np.testing.assert_array_equal(rows, expected)
    assert extras == expected_extras == [{"sex": None}, {"sex": "M"}, {"sex": None}]
    assert RAW_ENCODER.ignored_counts(raw) == {"const": 1, "weight": 1, "y": 2, "year": 1}
    assert RAW_ENCODER.ignored_counts(batch) == {} and ENCODER.ignored_counts(raw[:1]) == {}
    columns = {name: [r.get(name) for r in batch] for name in [*ENCODER.names, "sex"]}
    by_column, column_extras = RAW_ENCODER.encode_columns(columns | {"y": [1, 0, 0], "year": [None] * 3})
    np.testing.assert_array_equal(by_column, expected)
    assert column_extras == expected_extras
    assert RAW_ENCODER.ignored_counts(columns | {"y": [1, 0, 0], "year": [None] * 3}) == {"y": 3, "year": 3}
    assert RAW_ENCODER.ignored_counts(columns) == {}


def test_a_bad_record_among_raw_rows_names_itself():
    raw = [valid() | REMOVED, valid() | {"y": 0}, valid() | {"y": 0, "age": "31"}]
    with pytest.raises(InputError) as caught:
        RAW_ENCODER.encode_many(raw)
    assert str(caught.value).startswith("records[2]: ") and caught.value.field == "age"
    missing = valid() | {"y": 0}
    del missing["income"]
    with pytest.raises(InputError) as caught:
        RAW_ENCODER.encode_many([valid(), missing])
    assert str(caught.value).startswith("records[1]: ") and (caught.value.reason, caught.value.field) == (
        "missing_field", "income")
