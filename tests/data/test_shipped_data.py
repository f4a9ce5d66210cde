"""The shipped datasets are what the data card says they are."""
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name, rows, target, rate", [
    ("census_income_kdd", 299_285, "income_gt_50k", 0.062),
    ("credit_data", 4_454, "is_bad", 0.282),
    ("resume_callback", 4_870, "callback", 0.080),
])
def test_shipped_dataset_matches_its_card(name, rows, target, rate):
    path = ROOT / "data" / f"{name}.parquet"
    assert path.stat().st_size < 10 * 2**20
    frame = pd.read_parquet(path)
    assert len(frame) == rows
    assert set(frame[target].unique()) == {0, 1}
    assert frame[target].mean() == pytest.approx(rate, abs=0.001)
    assert name in (ROOT / "data" / "README.md").read_text()
