"""Shared fixtures: a small slice of the shipped census data, and a model trained once per test
session by the real stage scripts (few trials, 3 folds) for the data and model tiers."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")  # Debian's: Playwright's own browser download cannot work here
for key, value in {"MLFLOW_DISABLE_TELEMETRY": "true", "GRADIO_ANALYTICS_ENABLED": "False",
                   "HF_HUB_OFFLINE": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
    os.environ[key] = value
os.environ.pop("MLFLOW_TRACKING_URI", None)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run_stage(script: str, *args: str, cwd: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a stage script as a user would (own process, own working directory)."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, check=False,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def copy_project(src: Path, dst: Path) -> Path:
    """A copy of a trained project folder (artifacts with their alias links, and ./mlruns with its
    artifact locations moved into the copy, so runs logged there leave `src` as it was)."""
    from rareml.tracking import copy_file_store

    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True, ignore=shutil.ignore_patterns("mlruns"))
    if (src / "mlruns").is_dir():
        copy_file_store(src / "mlruns", dst / "mlruns")
    return dst


CENSUS_CONFIG = """
name = "census-small"
data = "census_small.parquet"
target = "income_gt_50k"
positive = 1
drop = ["instance_weight", "migration_code_change_in_msa", "migration_code_change_in_reg",
        "migration_code_move_within_reg", "migration_prev_res_in_sunbelt", "live_in_this_house_1_year_ago",
        "region_of_previous_residence", "state_of_previous_residence", "full_or_part_time_employment_stat"]
sensitive = ["sex", "race"]
time = "year"
categorical = ["detailed_industry_recode", "detailed_occupation_recode"]
cv_folds = 3
cv_repeats = 1
"""


@pytest.fixture(scope="session")
def census_small(tmp_path_factory) -> Path:
    """A config and 6,000 rows of the shipped census data (3,000 per year, positives oversampled)."""
    folder = tmp_path_factory.mktemp("census")
    full = pd.read_parquet(ROOT / "data" / "census_income_kdd.parquet")
    parts = [g.sample(n, random_state=0) for (_, label), g in full.groupby(["year", "income_gt_50k"])
             for n in [2700 if label == 0 else 300]]
    pd.concat(parts).sort_index().to_parquet(folder / "census_small.parquet")
    (folder / "config.toml").write_text(CENSUS_CONFIG)
    return folder / "config.toml"


@pytest.fixture(scope="session")
def trained(census_small, tmp_path_factory) -> Path:
    """Artifacts of the three real stages on the small census slice, MLflow in ./mlruns (the default)."""
    work = tmp_path_factory.mktemp("trained")
    args = ["--config", str(census_small), "--artifacts", str(work / "artifacts")]
    run_stage("01_prepare.py", *args, cwd=work)
    run_stage("02_tune.py", *args, "--n-trials", "4", "--time-budget", "300", cwd=work)
    run_stage("03_serialize.py", *args, "--bootstrap", "200", cwd=work)
    return work


def require_chromium() -> None:
    """Skip the test when Debian's chromium is missing (fail it when RAREML_REQUIRE_BROWSER is set,
    as in .ci/run)."""
    if not CHROMIUM.exists():
        if os.environ.get("RAREML_REQUIRE_BROWSER"):
            pytest.fail("RAREML_REQUIRE_BROWSER is set but /usr/bin/chromium is missing (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")


@contextmanager
def chromium_page(width: int, height: int = 1000):
    """A page of Debian's chromium driven by Playwright, closed afterwards (`require_chromium`)."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()
