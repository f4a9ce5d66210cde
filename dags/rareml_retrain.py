"""Airflow DAG `rareml_retrain`: one retraining of `make retrain` as its four steps (snapshot of the
labelled production rows, train, gate, promote), then the outcome written to the API's log, where
GET /alerts and the rareml_retrains gauge show it.

Started by POST /alerts (RAREML_AIRFLOW_URL set: the triggering alert is the run's conf) or by
hand. Each step is 06_retrain.py's own `--step`, run through its main(argv); tasks hand each other
only the run folder and versions. The champion moves only in `promote`, and only if the gate
passed: a run failing anywhere before leaves it as it was.
"""
from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:  # rareml and the stage scripts live beside this folder
    sys.path.insert(0, str(PROJECT))

from rareml.cli import DEFAULT_ARTIFACTS, DEFAULT_CONFIG, call_stage  # light: parsed often


def _step(step: str, params: dict, *more: str) -> dict:
    """06_retrain.py --step STEP with this run's params."""
    artifacts = (PROJECT / params["artifacts"]).resolve()
    argv = ["--config", str((PROJECT / params["config"]).resolve()), "--artifacts", str(artifacts),
            "--step", step, *more]
    if params.get("db"):
        argv += ["--db", str((PROJECT / params["db"]).resolve())]
    if params.get("budget"):
        argv += ["--budget", str(params["budget"])]
    if not params.get("mlflow", True):
        argv.append("--no-mlflow")
    return call_stage("06_retrain", argv)


@dag(dag_id="rareml_retrain", schedule=None, catchup=False, max_active_runs=1, tags=["rareml"],
     doc_md=__doc__, params={
         "config": Param(DEFAULT_CONFIG, type="string", description="dataset config (TOML), from the project"),
         "artifacts": Param(DEFAULT_ARTIFACTS, type="string",
                            description="the served artifacts folder (its champion, models and runs)"),
         "budget": Param(None, type=["null", "integer"], minimum=30, maximum=3 * 3600,
                         description="seconds for the retraining (default: the config's [retrain] budget_seconds)"),
         "db": Param(None, type=["null", "string"],
                     description="the API's prediction log (default: ARTIFACTS/serving/predictions.db)"),
         "mlflow": Param(True, type="boolean", description="log the stages and the gate's tags to MLflow"),
         "alert": Param(None, type=["null", "object"], description="the alert that triggered it (POST /alerts)"),
         "alert_keys": Param([], type="array", description="its queued retrainings in the log, to close")})
def rareml_retrain():
    @task(retries=1, retry_delay=timedelta(seconds=20), execution_timeout=timedelta(minutes=20))
    def snapshot(params: dict | None = None) -> dict:
        import json

        from rareml.errors import RareMLError
        from rareml.retrain import NotEnoughLabels

        try:
            return _step("snapshot", params, *(["--alert", json.dumps(params["alert"])] if params["alert"] else []))
        except NotEnoughLabels as exc:  # nothing to train: the next steps are skipped, the outcome recorded
            return {"run": None, "not_enough_labels": str(exc)}
        except RareMLError as exc:  # a user's mistake (no champion, ...): no retry can mend it
            raise AirflowFailException(str(exc)) from None

    @task(retries=0, execution_timeout=timedelta(hours=3, minutes=10))  # the budget stops the search in time
    def train(made: dict, params: dict | None = None) -> dict:
        if made["run"] is None:
            raise AirflowSkipException(made["not_enough_labels"])
        return _step("train", params, "--run", made["run"])

    @task(retries=1, retry_delay=timedelta(seconds=20), execution_timeout=timedelta(minutes=20))
    def gate(made: dict, params: dict | None = None) -> dict:
        return _step("gate", params, "--run", made["run"])

    @task(retries=2, retry_delay=timedelta(seconds=10), execution_timeout=timedelta(minutes=5))
    def promote(made: dict, params: dict | None = None) -> dict:
        return _step("promote", params, "--run", made["run"])  # again after a crash: a no-op

    @task(retries=3, retry_delay=timedelta(seconds=10), execution_timeout=timedelta(minutes=2),
          trigger_rule="all_done")
    def record(params: dict | None = None) -> dict:
        """The outcome into the API's log (the retrainings the alert queued); the run fails if the
        retraining did."""
        from rareml.store import Store

        ti = get_current_context()["ti"]
        made, outcome = ti.xcom_pull(task_ids="snapshot"), ti.xcom_pull(task_ids="promote")
        run_id = get_current_context()["run_id"]
        if outcome is None and made is not None and made.get("run") is None:
            outcome = {"outcome": "not_enough_labels", "reason": made["not_enough_labels"]}
        elif outcome is None:
            outcome = {"outcome": "failed", "reason": f"Airflow run {run_id} of rareml_retrain failed: see its task logs"}
        outcome |= {"dag_run_id": run_id}
        db = Path(params["db"] or Path(params["artifacts"]) / "serving" / "predictions.db")
        db = (PROJECT / db).resolve()
        if params["alert_keys"] and db.exists():
            Store(db, 1).finish_retrain(list(params["alert_keys"]), outcome["outcome"], outcome)
        if outcome["outcome"] == "failed":
            raise AirflowFailException(outcome["reason"])
        return outcome

    promote(gate(train(snapshot()))) >> record()


rareml_retrain()
