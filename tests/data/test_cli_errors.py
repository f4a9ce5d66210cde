"""Every user mistake ends a stage with one clear line and a non-zero exit, never a traceback."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import run_stage


def dataset(tmp_path: Path, **change) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=300), "c": rng.choice(["a", "b"], 300),
                          "y": (rng.random(300) < 0.1).astype(int)})
    frame.assign(**change).to_csv(tmp_path / "d.csv", index=False)


def config(tmp_path: Path, extra: str = "", data: str = "d.csv") -> Path:
    (tmp_path / "c.toml").write_text(f'name = "t"\ndata = "{data}"\ntarget = "y"\npositive = 1\n{extra}')
    return tmp_path / "c.toml"


def assert_one_line_error(proc, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr


@pytest.mark.parametrize("setup, extra, message", [
    (lambda p: None, "", "data file not found"),
    (lambda p: (p / "d.csv").write_bytes(b"\x00\x01garbage\xff"), "", "d.csv: cannot read it"),
    (lambda p: dataset(p, y=lambda f: f.x.round()), "", "target 'y' is not binary"),
    (lambda p: dataset(p), "positive = 2\n", None),  # duplicate key: invalid TOML
    (lambda p: dataset(p, y=0), "", "target 'y' is not binary: 1 distinct"),
    (lambda p: dataset(p, y=lambda f: np.where(f.y == 1, "bad", "good")), "", "positive label 1 not found"),
    (lambda p: dataset(p, y=lambda f: (np.arange(len(f)) < 3).astype(int)), "", "fewer than cv_folds"),
    (lambda p: dataset(p), 'drop = ["id"]\n', "'id' (drop)"),
    (lambda p: dataset(p), 'time = "when"\n', "'when' (time)"),
])
def test_prepare_refuses_bad_input_in_one_line(tmp_path, setup, extra, message):
    setup(tmp_path)
    proc = run_stage("01_prepare.py", "--config", str(config(tmp_path, extra)), "--artifacts",
                     str(tmp_path / "a"), cwd=tmp_path, check=False)
    assert_one_line_error(proc, message or "not valid TOML")


def test_missing_config(tmp_path):
    proc = run_stage("01_prepare.py", "--config", str(tmp_path / "none.toml"), cwd=tmp_path, check=False)
    assert_one_line_error(proc, "config file not found")


@pytest.mark.parametrize("script, first", [("02_tune.py", "make prepare"), ("03_serialize.py", "make tune")])
def test_a_stage_before_its_inputs_names_the_target_to_run(tmp_path, script, first):
    dataset(tmp_path)
    proc = run_stage(script, "--config", str(config(tmp_path)), "--artifacts", str(tmp_path / "a"),
                     cwd=tmp_path, check=False)
    assert_one_line_error(proc, first)


@pytest.mark.parametrize("extra, message", [
    ((), "no champion in"),  # nothing trained yet
    (("--alert", "{not json"), "--alert is not JSON"),
    (("--step", "snapshot"), "no champion in"),
    (("--step", "train"), "--step train needs --run"),
    (("--step", "gate", "--run", "nowhere"), "nowhere is not a retraining's folder"),
])
def test_retrain_refuses_bad_input_in_one_line(tmp_path, extra, message):
    dataset(tmp_path)
    proc = run_stage("06_retrain.py", "--config", str(config(tmp_path)), "--artifacts", str(tmp_path / "a"),
                     "--no-mlflow", *extra, cwd=tmp_path, check=False)
    assert_one_line_error(proc, message)


def test_a_retrain_policy_out_of_range_is_named(tmp_path):
    dataset(tmp_path)
    proc = run_stage("06_retrain.py", "--config", str(config(tmp_path, "[retrain]\ngate_share = 1.5\n")),
                     "--artifacts", str(tmp_path / "a"), cwd=tmp_path, check=False)
    assert_one_line_error(proc, "[retrain]: gate_share is out of range (1.5)")
