"""The layout of `artifacts/`, written down once: which stage writes which file."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Layout:
    """Paths of every file the stages exchange, under one artifacts folder."""

    root: Path

    # 01_prepare.py
    @property
    def train(self) -> Path:
        return self.root / "train.parquet"

    @property
    def test(self) -> Path:
        return self.root / "test.parquet"

    @property
    def prepared(self) -> Path:
        return self.root / "prepared.json"  # schema, reference statistics, split, fingerprints

    # 02_tune.py
    @property
    def tuned(self) -> Path:
        return self.root / "tuned.json"  # best params, CV metrics, MLflow run id

    @property
    def oof(self) -> Path:
        return self.root / "oof.parquet"  # out-of-fold scores of the best configuration

    @property
    def tuning(self) -> Path:
        return self.root / "tuning"  # trials.csv (the search history) and Optuna's figures, for the report

    # 03_serialize.py
    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in blocks (data files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _default(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_default) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
