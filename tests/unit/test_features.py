import numpy as np
import pandas as pd

from rareml.features import CATEGORICAL, NUMERIC, Feature, Schema, category_strings, to_frame, unseen_levels

SCHEMA = Schema(features=(Feature("age", NUMERIC, min=0, max=90), Feature("code", CATEGORICAL, categories=("1", "4")),
                          Feature("job", CATEGORICAL, categories=("a", "b"))), target="y", positive=1)


def test_records_become_typed_frame_in_schema_order():
    frame = to_frame([{"job": "b", "code": 4, "age": "31", "extra": 1}], SCHEMA)
    assert list(frame.columns) == ["age", "code", "job"]
    assert frame["age"].dtype == float and frame.loc[0, "age"] == 31.0
    assert list(frame["code"].cat.categories) == ["1", "4"] and frame.loc[0, "code"] == "4"


def test_unseen_levels_become_missing_and_are_counted():
    records = [{"age": 1, "code": 7, "job": "zzz"}, {"age": 2, "code": 1.0, "job": None}]
    frame = to_frame(records, SCHEMA)
    assert frame["code"].isna().tolist() == [True, False]
    assert frame["job"].isna().tolist() == [True, True]
    assert unseen_levels(pd.DataFrame(records), SCHEMA) == {"code": 1, "job": 1}


def test_missing_columns_are_missing_values():
    frame = to_frame([{"age": 3}], SCHEMA)
    assert frame["code"].isna().all() and frame["job"].isna().all()


def test_category_strings_normalise_numbers_and_keep_missing():
    out = category_strings(pd.Series([1.0, 2.5, np.nan]))
    assert out.iloc[0] == "1" and out.iloc[1] == "2.5" and pd.isna(out.iloc[2])
    assert category_strings(pd.Series([3, 4], dtype="Int64")).tolist() == ["3", "4"]
    assert category_strings(pd.Series([True, False])).tolist() == ["true", "false"]


def test_schema_round_trips_through_dict():
    assert Schema.from_dict(SCHEMA.to_dict()) == SCHEMA


def test_ordinal_encoding_is_the_level_position_and_keeps_missing():
    from rareml.families.xgboost import dmatrix

    frame = to_frame([{"age": 1, "code": "4", "job": "b"}, {"age": 2, "code": None, "job": "zzz"}], SCHEMA)
    native, ordinal = dmatrix(frame), dmatrix(frame, encoding="ordinal")
    assert native.feature_types == ["float", "c", "c"] and ordinal.feature_types == ["float", "float", "float"]
    values = ordinal.get_data().toarray()  # sparse: missing cells are absent, not zero
    assert values[0].tolist() == [1.0, 1.0, 1.0] and values[1, 0] == 2.0 and ordinal.get_data()[1].nnz == 1


def test_schema_keeps_its_ignored_columns_and_reads_a_manifest_without_them():
    schema = Schema(SCHEMA.features, "y", 1, sensitive=("sex",), ignored=("const", "y", "year"))
    assert Schema.from_dict(schema.to_dict()) == schema and schema.to_dict()["ignored"] == ["const", "y", "year"]
    old = {k: v for k, v in schema.to_dict().items() if k != "ignored"}  # a model folder from before `ignored`
    assert Schema.from_dict(old) == Schema(SCHEMA.features, "y", 1, sensitive=("sex",))
