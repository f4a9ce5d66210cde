"""Airflow in a child process of the tests (Airflow reads its settings and sets up its logging when
imported: kept out of pytest's process). Prints one JSON line.

  python airflow_child.py dags                  the DAGs folder: import errors, tasks, edges, params
  python airflow_child.py test DAG_ID CONF      dag.test() of one DAG with that run conf (JSON)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def dags() -> dict:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    return {"import_errors": {k: str(v)[:2000] for k, v in bag.import_errors.items()},
            "dags": {dag_id: {"tasks": {t.task_id: {"downstream": sorted(t.downstream_task_ids),
                                                      "retries": t.retries, "trigger_rule": str(t.trigger_rule),
                                                      "timeout": t.execution_timeout.total_seconds()
                                                      if t.execution_timeout else None}
                                        for t in dag.tasks},
                              "params": {k: dag.params[k] for k in dag.params},
                              "schedule": type(dag.timetable).__name__}
                     for dag_id, dag in bag.dags.items()}}


def test(dag_id: str, conf: dict) -> dict:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.session import create_session

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    run = bag.dags[dag_id].test(run_conf=conf)
    with create_session() as session:
        from airflow.models.taskinstance import TaskInstance

        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run.run_id)
        states = {ti.task_id: str(ti.state) for ti in tis}
    return {"state": str(run.state), "tasks": states}


if __name__ == "__main__":
    if sys.argv[1] == "dags":
        result = dags()
    else:
        result = test(sys.argv[2], json.loads(sys.argv[3]))
    print("RESULT " + json.dumps(result, default=str))
