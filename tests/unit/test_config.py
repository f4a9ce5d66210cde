from pathlib import Path

import pytest

from rareml.config import load_config
from rareml.errors import RareMLError

ROOT = Path(__file__).resolve().parents[2]
BASE = 'name = "x"\ndata = "d.csv"\ntarget = "y"\npositive = 1\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_shipped_configs_load():
    for path in (ROOT / "configs").glob("*.toml"):
        config = load_config(path)
        assert config.data.is_file(), path
        assert config.threshold.metric in ("f1", "cost", "fbeta")


def test_defaults_and_relative_data_path(tmp_path):
    config = load_config(write(tmp_path, BASE))
    assert config.data == (tmp_path / "d.csv").resolve()
    assert (config.test_size, config.threshold.metric, config.time) == (0.2, "f1", None)
    assert (config.folds_for(4_000), config.folds_for(200_000)) == (5, 3)
    assert load_config(write(tmp_path, BASE + "cv_folds = 4\n")).folds_for(200_000) == 4


def test_retrain_table_is_read(tmp_path):
    assert load_config(write(tmp_path, BASE)).retrain.budget_seconds == 420.0
    config = load_config(write(tmp_path, BASE + "[retrain]\nbudget_seconds = 90\nmin_new_labels = 50\n"))
    assert (config.retrain.budget_seconds, config.retrain.min_new_labels) == (90.0, 50)


def test_threshold_table_is_read(tmp_path):
    config = load_config(write(tmp_path, BASE + '[threshold]\nmetric = "cost"\ncost_fn = 7\n'))
    assert (config.threshold.metric, config.threshold.cost_fn, config.threshold.cost_fp) == ("cost", 7.0, 1.0)


@pytest.mark.parametrize("text, message", [
    ('name = "x"\ndata = "d.csv"\ntarget = "y"\n', "missing required key(s): positive"),
    (BASE + 'trget = "y"\n', "unknown key 'trget'"),
    (BASE + "drop = \"a\"\n", "'drop' has the wrong type"),
    (BASE + "drop = [1, 2]\n", "'drop' must be a list of column names"),
    (BASE + "cv_folds = 1\n", "cv_folds must be between 2 and 20"),
    (BASE + "test_size = 1.5\n", "test_size must be between 0 and 1"),
    (BASE + 'categorical = ["a"]\nnumeric = ["a"]\n', "both categorical and numeric: a"),
    (BASE + 'drop = ["y"]\n', "the target 'y' cannot also be dropped"),
    (BASE + '[threshold]\nmetric = "accuracy"\n', "metric 'accuracy' is not one of"),
    (BASE + '[threshold]\nmetric = "min_precision"\nmin_precision = 1.5\n', "min_precision must be in (0, 1]"),
    (BASE + '[threshold]\nmetrc = "f1"\n', "unknown key 'metrc'"),
    (BASE + "[retrain]\nbudget_seconds = 5\n", "[retrain]: budget_seconds is out of range (5.0)"),
    ('name = "x\n', "not valid TOML"),
])
def test_bad_configs_name_the_problem(tmp_path, text, message):
    with pytest.raises(RareMLError, match=None) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(RareMLError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
