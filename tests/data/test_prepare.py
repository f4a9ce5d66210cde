"""The dataset contract: validation, the schema, and no leakage between the splits."""
import json
import logging

import numpy as np
import pandas as pd
import pytest

from rareml.config import load_config
from rareml.data import (
    LABEL,
    infer_schema,
    load_table,
    load_tables,
    prepare,
    reference_stats,
    split,
    split_warnings,
    weights_of,
)
from rareml.errors import InputError, RareMLError
from rareml.model import load_model
from rareml.scoring import LocalScorer
from tests.conftest import run_stage


def frame(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype(int)
    return pd.DataFrame({
        "num": rng.normal(size=n) + y, "cat": rng.choice(["a", "b", "c"], n), "code": rng.integers(1, 5, n),
        "const": 7, "empty": np.nan, "period": np.where(np.arange(n) < n * 0.6, 2020, 2021), "y": y,
    })


def config(tmp_path, extra=""):
    path = tmp_path / "c.toml"
    path.write_text('name = "t"\ndata = "d.csv"\ntarget = "y"\npositive = 1\n' + extra)
    return load_config(path)


def test_constant_and_empty_columns_are_dropped_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        prepared = prepare(frame(), config(tmp_path))
    assert prepared.dropped == {"const": "constant", "empty": "all values missing"}
    assert "dropping column 'const': constant" in caplog.text
    assert set(prepared.kinds) == {"num", "cat", "code", "period"}


def test_the_columns_the_pipeline_removed_are_ignored_in_table_order(tmp_path):
    """Dropped (by the config, as constant, as all missing), the target and the time column: a raw row
    of the table may carry them; a sensitive attribute stays one even if dropped or constant."""
    cfg = config(tmp_path, 'drop = ["code", "cat"]\ntime = "period"\nsensitive = ["cat", "const"]\n')
    prepared = prepare(frame(), cfg)
    assert prepared.ignored == ("code", "empty", "period", "y")
    train, _, _ = split(prepared.frame, cfg)
    schema = infer_schema(train, prepared.kinds, cfg, prepared.ignored)
    assert schema.ignored == ("code", "empty", "period", "y") and schema.names == ["num"]
    assert schema.sensitive == ("cat", "const")
    assert prepare(frame(), config(tmp_path)).ignored == ("const", "empty", "y")


def test_types_are_inferred_and_overridden(tmp_path):
    kinds = prepare(frame(), config(tmp_path, 'categorical = ["code"]\ndrop = ["period"]\n')).kinds
    assert kinds == {"num": "numeric", "cat": "categorical", "code": "categorical"}


def test_numeric_override_with_text_names_the_value(tmp_path):
    with pytest.raises(RareMLError, match="'cat' is listed as numeric but holds"):
        prepare(frame(), config(tmp_path, 'numeric = ["cat"]\n'))


@pytest.mark.parametrize("change, extra, message", [
    (lambda f: f.assign(y=np.arange(len(f)) % 3), "", "target 'y' is not binary: 3 distinct values"),
    (lambda f: f, "", None),
    (lambda f: f.assign(y=np.where(f.y == 1, "yes", "no")), "", "positive label 1 not found in target 'y'"),
    (lambda f: f, 'sensitive = ["gender"]\n', "'gender' (sensitive)"),
    (lambda f: f.drop(columns="y"), "", "'y' (target)"),
])
def test_bad_data_is_refused_with_the_reason(tmp_path, change, extra, message):
    data = change(frame())
    if message is None:
        assert prepare(data, config(tmp_path, extra)).frame[LABEL].sum() == data.y.sum()
        return
    with pytest.raises(RareMLError) as err:
        prepare(data, config(tmp_path, extra))
    assert message in str(err.value)


def test_string_positive_label_matches(tmp_path):
    data = frame().assign(y=lambda f: np.where(f.y == 1, "bad", "good"))
    prepared = prepare(data, config(tmp_path).__class__(**{**vars(config(tmp_path)), "positive": "bad"}))
    assert prepared.frame[LABEL].tolist() == (data.y == "bad").astype(int).tolist()


def test_stratified_split_is_disjoint_complete_and_stratified(tmp_path):
    cfg = config(tmp_path)
    data = prepare(frame(2000), cfg).frame
    train, test, how = split(data, cfg)
    assert set(train.index).isdisjoint(test.index)
    assert sorted(train.index.append(test.index)) == sorted(data.index)
    assert len(test) == pytest.approx(0.2 * len(data), abs=1)
    assert test[LABEL].mean() == pytest.approx(data[LABEL].mean(), abs=0.005)
    assert how.startswith("stratified")


def test_time_split_tests_on_the_latest_period(tmp_path):
    cfg = config(tmp_path, 'time = "period"\n')
    prepared = prepare(frame(2000), cfg)
    train, test, _ = split(prepared.frame, cfg)
    assert set(test["period"]) == {2021} and set(train["period"]) == {2020}
    assert "period" not in prepared.kinds


def test_too_few_positives_for_the_folds(tmp_path):
    data = frame(400).assign(y=lambda f: (np.arange(len(f)) < 5).astype(int))
    cfg = config(tmp_path, "cv_folds = 5\n")
    with pytest.raises(RareMLError, match="fewer than cv_folds = 5"):
        split(prepare(data, cfg).frame, cfg)


def test_schema_and_reference_come_from_training_rows_only(tmp_path):
    cfg = config(tmp_path)
    data = prepare(frame(2000), cfg)
    train, test, _ = split(data.frame, cfg)
    test = test.copy()
    test.loc[test.index[:5], "cat"] = "only-in-test"
    schema = infer_schema(train, data.kinds, cfg)
    cat = next(f for f in schema.features if f.name == "cat")
    assert "only-in-test" not in cat.categories
    num = next(f for f in schema.features if f.name == "num")
    assert (num.min, num.max) == (train["num"].min(), train["num"].max())
    ref = reference_stats(train, schema)
    assert sum(ref["num"]["shares"]) + ref["num"]["missing"] == pytest.approx(1)
    assert sum(ref["cat"]["shares"].values()) + ref["cat"]["other"] + ref["cat"]["missing"] == pytest.approx(1)


def test_high_cardinality_levels_are_capped(tmp_path):
    cfg = config(tmp_path, "max_categories = 3\n")
    data = frame(1000).assign(cat=lambda f: [f"id{i % 50}" for i in range(len(f))])
    prepared = prepare(data, cfg)
    train, _, _ = split(prepared.frame, cfg)
    cat = next(f for f in infer_schema(train, prepared.kinds, cfg).features if f.name == "cat")
    assert len(cat.categories) == 3


def test_split_warnings_flag_columns_coded_differently_per_period():
    train = pd.DataFrame({"a": ["x", "y"] * 5, "b": ["x"] * 10, "c": [1.0] * 10})
    test = pd.DataFrame({"a": ["x", "y"] * 5, "b": ["x", "z"] * 5, "c": [np.nan] * 10})
    found = split_warnings(train, test, {"a": "categorical", "b": "categorical", "c": "numeric"})
    assert len(found) == 2 and "'b' has 1 value" in found[0] and "'c' is missing in 0%" in found[1]


@pytest.mark.parametrize("name, content, message", [
    ("d.txt", b"a,b\n1,2\n", "unsupported format"),
    ("d.parquet", b"not parquet", "cannot read it as .parquet"),
    ("d.csv", b"", "cannot read it as .csv"),
    ("d.csv", b"a,b\n", "no rows"),
])
def test_unreadable_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(RareMLError, match=message):
        load_table(tmp_path / name)


def test_a_separate_test_file_is_the_test_split(tmp_path):
    data = frame(1000)
    data.iloc[:700].to_csv(tmp_path / "train.csv", index=False)
    data.iloc[700:].to_csv(tmp_path / "test.csv", index=False)
    (tmp_path / "c.toml").write_text('name = "t"\ndata = "train.csv"\ntest_data = "test.csv"\ntarget = "y"\n'
                                     'positive = 1\n')
    cfg = load_config(tmp_path / "c.toml")
    prepared = prepare(load_tables(cfg), cfg)
    assert "_is_test" not in prepared.kinds
    train, test, how = split(prepared.frame, cfg)
    assert (len(train), len(test)) == (700, 300) and how == "separate test file: test.csv"
    assert np.allclose(test["num"].to_numpy(), data["num"].iloc[700:].to_numpy())
    assert "_is_test" not in train.columns
    data.drop(columns="cat").to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(RareMLError, match="different columns: cat"):
        load_tables(cfg)


@pytest.mark.slow
def test_a_raw_row_of_the_table_scores_through_the_real_stages(tmp_path):
    """The three stages on a small table with a constant column: the schema in prepared.json and in
    the manifest lists what the pipeline removed, and the model scores a row of the table as it is
    as it scores the same row cut down to its features."""
    data = frame(1200, seed=1).assign(weight=lambda f: np.arange(len(f)) / 7)
    data.to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "c.toml").write_text('name = "t"\ndata = "d.csv"\ntarget = "y"\npositive = 1\ndrop = ["weight"]\n'
                                     'time = "period"\ncv_folds = 3\ncv_repeats = 1\n')
    args = ["--config", str(tmp_path / "c.toml"), "--artifacts", str(tmp_path / "a")]
    prepared = run_stage("01_prepare.py", *args, cwd=tmp_path)
    assert "dropping column 'const': constant" in prepared.stderr
    ignored = ["const", "empty", "period", "y", "weight"]  # in the table's order
    assert json.loads((tmp_path / "a" / "prepared.json").read_text())["schema"]["ignored"] == ignored
    run_stage("02_tune.py", *args, "--n-trials", "2", "--time-budget", "120", cwd=tmp_path)
    run_stage("03_serialize.py", *args, "--bootstrap", "20", "--no-mlflow", cwd=tmp_path)
    model = load_model(tmp_path / "a" / "model")
    assert model.manifest["schema"]["ignored"] == ignored and list(model.schema.ignored) == ignored
    table = pd.read_csv(tmp_path / "d.csv").tail(40)
    raw = [{k: None if pd.isna(v) else v for k, v in row.items()} for row in table.to_dict("records")]
    cut = [{k: r[k] for k in model.schema.names} for r in raw]
    scorer, encoder = LocalScorer(model), model.encoder
    assert [scorer.score(r)["probability"] for r in raw] == [scorer.score(r)["probability"] for r in cut]
    np.testing.assert_array_equal(encoder.encode_many(raw)[0], encoder.encode_many(cut)[0])
    columns = {k: [r[k] for r in raw] for k in raw[0]}
    np.testing.assert_array_equal(encoder.encode_columns(columns)[0], encoder.encode_many(cut)[0])
    assert encoder.ignored_fields(raw[0]) == sorted(ignored) and encoder.ignored_counts(raw) == dict.fromkeys(
        sorted(ignored), len(raw))
    with pytest.raises(InputError, match="unknown field 'height'") as caught:
        encoder.encode(raw[0] | {"height": 180})
    assert caught.value.field == "height"


def test_a_weight_column_weighs_rows_and_is_never_a_feature(tmp_path):
    data = frame().assign(w=np.linspace(0.5, 2.0, 400))
    cfg = config(tmp_path, 'weight = "w"\n')
    prepared = prepare(data, cfg)
    assert "w" not in prepared.kinds and "w" in prepared.ignored
    np.testing.assert_array_equal(weights_of(prepared.frame), data.w.to_numpy())
    assert weights_of(prepare(frame(), config(tmp_path)).frame) is None
    for bad, message in ((-1.0, "holds -1.0"), (np.nan, "holds nan"), ("heavy", "holds 'heavy'")):
        with pytest.raises(RareMLError, match=f"weight column 'w' {message}"):
            prepare(data.assign(w=data.w.astype(object).where(data.index != 3, bad)), cfg)
    with pytest.raises(RareMLError, match="zero everywhere"):
        prepare(data.assign(w=0.0), cfg)
    with pytest.raises(RareMLError, match="'nope' \\(weight\\)"):
        prepare(data, config(tmp_path, 'weight = "nope"\n'))
