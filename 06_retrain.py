"""Stage 6: retrain on the labelled production rows, gate the challenger against the champion on the
newest of them, and promote it only if it is better.

One retraining (`make retrain`) runs the same stage code as `make all` (01_prepare, 02_tune,
03_serialize, in this process) into artifacts/runs/<UTC time>/, within BUDGET seconds, on the
champion's training rows plus the labelled production rows from the prediction log (the
`[retrain]` policy of the config: rareml/retrain.py). The new model is registered as the
challenger; the gate (paired bootstrap on the gate set) decides; the decision and its evidence go
to runs/<time>/gate.json, to artifacts/gates/<challenger>.json (GET /model shows the champion's)
and to MLflow tags on both registered versions. A promotion moves the champion alias, which every
running API worker follows within seconds (hot swap). `--watch` (`make retrain-watch`) waits for
retrain="true" alerts queued by POST /alerts and runs one retraining at a time, each in its own
process with a deadline, with a cooldown; every outcome is recorded in the log (GET /alerts).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from rareml import registry, retrain
from rareml.artifacts import read_json, write_json
from rareml.cli import run, stage_parser
from rareml.config import Config, load_config
from rareml.errors import RareMLError
from rareml.model import load_model
from rareml.monitoring import FAIRNESS_BOUND
from rareml.store import Store

log = logging.getLogger("06_retrain")
HERE = Path(__file__).resolve().parent
OVERRUN_S = 300.0  # the watcher stops a retraining this long past its budget (then: failed)
RUN, GATE_ROWS = "run.json", "gate_rows.json"  # what the steps hand each other in runs/<time>/


STEPS = ("snapshot", "train", "gate", "promote")  # one retraining, in this order (the Airflow DAG's tasks)


def snapshot(config: Config, root: Path, db: Path, alert: dict | None = None) -> Path:
    """Step 1: the retraining's data from the champion's training rows and the labelled production
    rows of the log, into a new runs/<time>/ (data.parquet, gate.parquet, run.json); returns that
    folder. NotEnoughLabels when the policy finds too few labelled production rows."""
    started = time.time()
    champion = registry.version_of(root, registry.CHAMPION)
    if champion is None:
        raise RareMLError(f"no champion in {root}: train one first (make all)")
    old = load_model(registry.serving_dir(root))
    labelled = Store(db, len(old.schema.features)).labelled_records()
    production = retrain.production_rows(labelled, config.retrain, now=started)
    run_dir = root / "runs" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir.mkdir(parents=True, exist_ok=False)
    log.info("retraining in %s: %d labelled production rows to train on, %d in the gate set (%d skipped: "
             "no record as sent); champion %s", run_dir, len(production.train), len(production.gate),
             production.skipped, champion)
    table, gate_table = retrain.retraining_tables(config, retrain.original_training_rows(config), production)
    table.to_parquet(run_dir / "data.parquet")
    gate_table.to_parquet(run_dir / "gate.parquet")
    write_json(run_dir / GATE_ROWS, production.gate)
    write_json(run_dir / RUN, {"started": started, "champion": champion, "alert": alert})
    return run_dir


def train(config: Config, root: Path, run_dir: Path, budget: float, use_mlflow: bool = True) -> str:
    """Step 2: the same stage code as make all (01_prepare, 02_tune warm-started from the champion,
    03_serialize) in this process, into run_dir; the budget counts from the snapshot. Returns the
    challenger's version."""
    run = read_json(run_dir / RUN)
    common = ["--config", str(config.path), "--artifacts", str(run_dir)]
    # the stages' own main(argv), as make runs them (this script's folder is on sys.path, as for every stage)
    importlib.import_module("01_prepare").main([*common, "--data", str(run_dir / "data.parquet"),
                              "--test-data", str(run_dir / "gate.parquet"), "--weight", retrain.weight_column(config)])
    tags = [f"retrain.alert={(run['alert'] or {}).get('alertname', 'manual')}", f"retrain.parent={run['champion']}",
            f"retrain.run={run_dir.name}"]
    importlib.import_module("02_tune").main([*common, "--time-budget", str(budget), "--started-at", str(run["started"]),
                           "--warm-start", str(root / registry.MODELS / run["champion"]),
                           *[a for t in tags for a in ("--tag", t)]])
    importlib.import_module("03_serialize").main([*common, "--registry", str(root)] + ([] if use_mlflow else ["--no-mlflow"]))
    return read_json(run_dir / "serialized.json")["model_version"]


def gate(config: Config, root: Path, run_dir: Path, fairness_bound: float = FAIRNESS_BOUND,
         n_boot: int = 1000) -> dict:
    """Step 3: champion and challenger scored on the gate set as the API scores them; the decision
    and its evidence to run_dir/gate.json and gates/<challenger>.json. Decides, promotes nothing."""
    run = read_json(run_dir / RUN)
    challenger = read_json(run_dir / "serialized.json")["model_version"]
    old = load_model(root / registry.MODELS / run["champion"])
    new = load_model(root / registry.MODELS / challenger)  # verified: the published copies, not the run's folder
    rows = read_json(run_dir / GATE_ROWS)
    y = retrain.labels(rows)
    records = [r["record"] for r in rows]
    p_old, p_new = old.predict_proba(records), new.predict_proba(records)
    decision = retrain.gate(y, p_old, p_new, (p_old >= old.threshold, p_new >= new.threshold),
                            retrain.groups_of(records, new.schema.sensitive), config.retrain, fairness_bound,
                            n_boot=n_boot, seed=config.seed)
    decision |= {"champion": run["champion"], "challenger": challenger, "alert": run["alert"], "run": run_dir.name,
                 "decided_at": datetime.now(UTC).isoformat(timespec="seconds")}
    record_decision(root, run_dir, decision)
    ap = decision["average_precision"]
    log.info("gate: challenger %s AP %.4f vs champion %s AP %.4f on %d rows (%d positive): difference %+.4f "
             "[%+.4f, %+.4f]: %s", challenger, ap["challenger"]["value"], run["champion"], ap["champion"]["value"],
             decision["rows"], decision["positives"], ap["difference"]["value"], ap["difference"]["low"],
             ap["difference"]["high"], "PROMOTE" if decision["promote"] else "reject: " + "; ".join(decision["reasons"]))
    return decision


def record_decision(root: Path, run_dir: Path, decision: dict) -> None:
    """The gate's decision and evidence: runs/<time>/gate.json, and gates/<challenger>.json (GET /model)."""
    write_json(run_dir / "gate.json", decision)
    write_json(root / registry.GATES / f"{decision['challenger']}.json", decision)


def promote(config: Config, root: Path, run_dir: Path, use_mlflow: bool = True) -> dict:
    """Step 4: the gate's decision carried out (the champion alias moves only if it passed; again
    is a no-op), the MLflow tags set; returns the outcome (also run_dir/outcome.json)."""
    run, decision = read_json(run_dir / RUN), read_json(run_dir / "gate.json")
    now = registry.version_of(root, registry.CHAMPION)
    if decision["promote"] and now not in (run["champion"], decision["challenger"]):  # judged against another
        reason = f"the champion changed from {run['champion']} to {now} after the snapshot: judged against the old one"
        decision |= {"promote": False, "reasons": [reason]}
        record_decision(root, run_dir, decision)
    if decision["promote"]:
        registry.promote(root, decision["challenger"])
    if use_mlflow:
        tag_versions(config.name, decision)
    outcome = {"outcome": "promoted" if decision["promote"] else "rejected", "champion": decision["champion"],
               "challenger": decision["challenger"], "run": str(run_dir), "reasons": decision["reasons"],
               "average_precision": decision["average_precision"], "seconds": round(time.time() - run["started"], 1)}
    write_json(run_dir / "outcome.json", outcome)
    return outcome


def retrain_once(config: Config, root: Path, db: Path, budget: float, alert: dict | None = None,
                 fairness_bound: float = FAIRNESS_BOUND, n_boot: int = 1000, use_mlflow: bool = True) -> dict:
    """One retraining, end to end: the four steps in one process; returns its outcome."""
    run_dir = snapshot(config, root, db, alert)
    train(config, root, run_dir, budget, use_mlflow)
    gate(config, root, run_dir, fairness_bound, n_boot)
    return promote(config, root, run_dir, use_mlflow)


def tag_versions(name: str, decision: dict) -> None:
    """The gate's decision and evidence as tags of both registered versions (and the aliases moved)."""
    registered = registry.mlflow_versions(name)
    if registered is None:  # the local gate.json is the record
        return
    client, found = registered
    ap = decision["average_precision"]
    tags = {"gate.decision": "promoted" if decision["promote"] else "rejected",
            "gate.reasons": "; ".join(decision["reasons"]) or "-", "gate.rows": str(decision["rows"]),
            "gate.positives": str(decision["positives"]), "gate.run": decision["run"],
            "gate.ap_difference": f"{ap['difference']['value']:.5f} [{ap['difference']['low']:.5f}, "
                                  f"{ap['difference']['high']:.5f}]"}
    for role in ("champion", "challenger"):
        version = found.get(decision[role])
        if version is None:
            continue
        mine = {"gate.role": role, "gate.ap": f"{ap[role]['value']:.5f} [{ap[role]['low']:.5f}, {ap[role]['high']:.5f}]"}
        for key, value in (tags | mine).items():
            client.set_model_version_tag(name, version, key, value)
    if decision["promote"]:
        registry.sync_mlflow(name, {registry.CHAMPION: decision["challenger"], registry.PREVIOUS: decision["champion"]})


# -- the watcher ------------------------------------------------------------------------------

def watch(args: argparse.Namespace, config: Config, db: Path) -> None:
    """Run one retraining per batch of queued alerts, each in a child process with a deadline."""
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    store = Store(db, 1)
    log.info("watching %s for retrain alerts every %.0f s (cooldown %.0f s, budget %.0f s)", db, args.poll,
             config.retrain.cooldown_seconds, args.budget)
    polls = 0
    while not stop["now"] and (args.max_polls is None or polls < args.max_polls):
        polls += 1
        last = store.last_retrain_finished()
        if last is None or time.time() - last >= config.retrain.cooldown_seconds:
            claimed = store.claim_retrain()
            if claimed:
                outcome = run_child(args, claimed)
                store.finish_retrain([c["id"] for c in claimed], outcome.pop("outcome"), outcome)
                continue
        time.sleep(args.poll)


def run_child(args: argparse.Namespace, claimed: list[dict]) -> dict:
    """One retraining for the claimed alerts, in its own process (a crash or a hang cannot take the
    watcher with it)."""
    out = args.artifacts / "runs" / f"retrain-{claimed[0]['id']}.json"
    alert = {"alertname": ", ".join(sorted({c["alertname"] for c in claimed})), "alerts": [c["alert"] for c in claimed]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    command = [sys.executable, str(HERE / "06_retrain.py"), "--config", args.config, "--artifacts",
               str(args.artifacts), "--db", str(args.db_path), "--budget", str(args.budget), "--outcome", str(out),
               "--alert", json.dumps(alert), "--fairness-bound",
               str(args.fairness_bound), "--bootstrap", str(args.bootstrap)] + (["--no-mlflow"] if args.no_mlflow else [])
    log.info("retraining for %s", ", ".join(alert["alerts"]))
    leash = max(args.budget + args.overrun, 0.1)
    try:
        done = subprocess.run(command, timeout=leash, check=False)
    except subprocess.TimeoutExpired:
        return {"outcome": "failed", "reason": f"ran past its budget of {args.budget:.0f} s: stopped after {leash:.1f} s"}
    if out.exists():
        return read_json(out)
    return {"outcome": "failed", "reason": f"the retraining exited with status {done.returncode}"}


def main(argv: list[str] | None = None) -> dict | None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, help="the API's prediction log (default: ARTIFACTS/serving/predictions.db)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for one retraining (default: the config's [retrain] budget_seconds, 420)")
    parser.add_argument("--alert", help="the alert that triggered it (JSON), recorded in the run and its tags")
    parser.add_argument("--fairness-bound", type=float, default=FAIRNESS_BOUND,
                        help="the widest group gap the gate accepts (the API's --fairness-bound)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples of the gate")
    parser.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")
    parser.add_argument("--outcome", type=Path, help=argparse.SUPPRESS)  # where a watcher's child writes it
    parser.add_argument("--watch", action="store_true", help="wait for retrain alerts and retrain on each")
    parser.add_argument("--step", choices=STEPS, help="run one step only (snapshot first, then each on its --run)")
    parser.add_argument("--run", type=Path, help="the runs/<time> folder the snapshot step made (--step)")
    parser.add_argument("--poll", type=float, default=10.0, help="seconds between looks at the queue (--watch)")
    parser.add_argument("--max-polls", type=int, default=None, help=argparse.SUPPRESS)  # tests: a bounded watch
    parser.add_argument("--overrun", type=float, default=OVERRUN_S, help=argparse.SUPPRESS)  # tests: a short (even negative) leash
    args = parser.parse_args(argv)
    config = load_config(args.config)
    args.artifacts = args.artifacts.resolve()
    args.db_path = (args.db or args.artifacts / "serving" / "predictions.db").resolve()
    args.budget = args.budget or config.retrain.budget_seconds
    if args.watch:
        watch(args, config, args.db_path)
        return None
    try:
        alert = json.loads(args.alert) if args.alert else None
    except json.JSONDecodeError as exc:
        raise RareMLError(f"--alert is not JSON: {exc}") from None
    if args.step:
        result = run_step(args, config, alert)
        print(json.dumps(result))
        return result
    try:
        outcome = retrain_once(config, args.artifacts, args.db_path, args.budget, alert, args.fairness_bound,
                               args.bootstrap, not args.no_mlflow)
    except retrain.NotEnoughLabels as exc:
        outcome = {"outcome": "not_enough_labels", "reason": str(exc), "alert": alert}
        log.info("no retraining: %s", exc)
    except RareMLError as exc:
        outcome = {"outcome": "failed", "reason": str(exc)}
        if args.outcome:
            write_json(args.outcome, outcome)
        raise
    if args.outcome:
        write_json(args.outcome, outcome)
    print(f"retraining:   {outcome['outcome']}" + (f" ({outcome['reason']})" if "reason" in outcome else ""))
    if "challenger" in outcome:
        print(f"challenger:   {outcome['challenger']} (champion {'now' if outcome['outcome'] == 'promoted' else 'still'} "
              f"{outcome['challenger'] if outcome['outcome'] == 'promoted' else outcome['champion']})\n"
              f"evidence:     {outcome['run']}/gate.json")
    return outcome


def run_step(args: argparse.Namespace, config: Config, alert: dict | None) -> dict:
    """--step: one of the four steps on its own (the Airflow DAG runs them as tasks); a small dict
    of what it made (paths, versions), for the next step."""
    if args.step == "snapshot":
        return {"run": str(snapshot(config, args.artifacts, args.db_path, alert))}
    if args.run is None:
        raise RareMLError(f"--step {args.step} needs --run, the folder the snapshot step made")
    run_dir = args.run.resolve()
    if not (run_dir / RUN).is_file():
        raise RareMLError(f"{args.run} is not a retraining's folder (no {RUN}): give --run the folder that "
                          "--step snapshot printed")
    if args.step == "train":
        return {"run": str(run_dir), "challenger": train(config, args.artifacts, run_dir, args.budget,
                                                         not args.no_mlflow)}
    if args.step == "gate":
        decision = gate(config, args.artifacts, run_dir, args.fairness_bound, args.bootstrap)
        return {"run": str(run_dir), "challenger": decision["challenger"], "promote": decision["promote"]}
    outcome = promote(config, args.artifacts, run_dir, not args.no_mlflow)
    return {k: outcome[k] for k in ("run", "outcome", "champion", "challenger")}


if __name__ == "__main__":
    run(main)
