"""Airflow DAG `rareml_train`: the training pipeline of `make all`, then the Space folder and the
report (`make report`), each task the stage's own main(argv) in the task's process.

Params (the Makefile's defaults): config, artifacts, budget (seconds from prepare to a registered
model), space_dir, report_monitoring (07_report.py --monitoring). Tasks hand each other only paths,
times and versions.
"""
from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

from airflow.sdk import Param, dag, task

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:  # rareml and the stage scripts live beside this folder
    sys.path.insert(0, str(PROJECT))

from rareml.cli import DEFAULT_ARTIFACTS, DEFAULT_CONFIG, call_stage  # light: parsed often

BUDGET, SPACE_DIR, MONITORING = 600, "space", "auto"  # the Makefile's BUDGET, SPACE_DIR and MONITORING


def _path(value: str) -> str:
    return str((PROJECT / value).resolve())


def _common(run: dict) -> list[str]:
    return ["--config", run["config"], "--artifacts", run["artifacts"]]


@dag(dag_id="rareml_train", schedule=None, catchup=False, max_active_runs=1, tags=["rareml"],
     doc_md=__doc__, params={
         "config": Param(DEFAULT_CONFIG, type="string", description="dataset config (TOML), from the project"),
         "artifacts": Param(DEFAULT_ARTIFACTS, type="string", description="folder the stages share"),
         "budget": Param(BUDGET, type="integer", minimum=30, maximum=6 * 3600,
                         description="seconds from prepare to a registered model"),
         "space_dir": Param(SPACE_DIR, type="string", description="the Hugging Face Space folder"),
         "report_monitoring": Param(MONITORING, enum=["auto", "run", "reuse", "skip"],
                                    description="monitoring screenshots in the report (07_report.py --monitoring)")})
def rareml_train():
    @task(retries=1, retry_delay=timedelta(seconds=30), execution_timeout=timedelta(minutes=30))
    def prepare(params: dict | None = None) -> dict:
        import time

        started = time.time()
        run = {"config": _path(params["config"]), "artifacts": _path(params["artifacts"]), "started": started,
               "budget": params["budget"]}
        call_stage("01_prepare", _common(run))
        return run

    @task(retries=0, execution_timeout=timedelta(hours=6, minutes=30))  # its own budget stops it in time
    def tune(run: dict) -> dict:
        call_stage("02_tune", [*_common(run), "--time-budget", str(run["budget"]), "--started-at", str(run["started"])])
        return run

    @task(retries=1, retry_delay=timedelta(seconds=30), execution_timeout=timedelta(hours=1))
    def serialize(run: dict) -> dict:
        from rareml.artifacts import read_json

        call_stage("03_serialize", _common(run))
        return {"artifacts": run["artifacts"],
                "model_version": read_json(Path(run["artifacts"]) / "serialized.json")["model_version"]}

    @task(retries=2, retry_delay=timedelta(seconds=10), execution_timeout=timedelta(minutes=10))
    def space(model: dict, params: dict | None = None) -> dict:
        out = _path(params["space_dir"])
        call_stage("rareml.space", ["--artifacts", model["artifacts"], "--out", out])
        return model | {"space_dir": out}

    @task(retries=1, retry_delay=timedelta(seconds=30), execution_timeout=timedelta(minutes=30))
    def report(model: dict, params: dict | None = None) -> str:
        done = call_stage("07_report", ["--artifacts", model["artifacts"], "--monitoring", params["report_monitoring"]])
        return done["out"]

    report(space(serialize(tune(prepare()))))


rareml_train()
