"""What every stage script shares at its edge: arguments, input checks, one-line errors."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rareml.errors import RareMLError

DEFAULT_CONFIG, DEFAULT_ARTIFACTS = "configs/census_income_kdd.toml", "artifacts"  # the Makefile's too


def stage_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every stage script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="dataset config (TOML)")
    parser.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, type=Path, help="folder the stages share")
    return parser


def require(path: Path, make_target: str) -> Path:
    """Fail with the Make target to run first when a stage's input is missing."""
    if not path.exists():
        raise RareMLError(f"{path} not found: run `make {make_target}` first (with the same ARTIFACTS)")
    return path


def run(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a stage's main(): configure logging, and exit 2 with one line on a user error."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        main(argv)
    except RareMLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


PROJECT = Path(__file__).resolve().parent.parent  # the folder holding the numbered stage scripts


def call_stage(script: str, argv: list[str]):
    """Run a stage script's own main(argv) (e.g. "02_tune") in this process, from the project
    folder as make runs it, and return what it returns. For orchestrators (the Airflow DAGs):
    the same code as `make`, never a second implementation."""
    if str(PROJECT) not in sys.path:
        sys.path.insert(0, str(PROJECT))
    module = importlib.import_module(script)
    here = os.getcwd()
    os.chdir(PROJECT)  # relative defaults (configs/, mlruns) mean what they mean under make
    try:
        return module.main(argv)
    finally:
        os.chdir(here)
