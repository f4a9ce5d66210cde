"""Stage 3: select the model families, or a blend of them, on their out-of-fold scores; refit each
chosen family with its best configuration (on small data, XGBoost's few best trials averaged into one
booster), calibrate, choose the threshold, evaluate once on the untouched test split, explain, and
write artifacts/model/ (each family in its own format, never a pickle; calibrator and threshold as
JSON; a manifest with checksums); log it all to MLflow and register it as the `challenger` (the first model of an
artifacts folder is the `champion` too: see rareml/registry.py). `--promote [VERSION]` and
`--rollback` move the aliases and train nothing.
"""
from __future__ import annotations

import json
import logging
import platform
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import sklearn

from rareml import metrics, plots, registry
from rareml.artifacts import Layout, read_json, write_json
from rareml.calibration import select_calibrator
from rareml.cli import require, run, stage_parser
from rareml.config import Config, load_config
from rareml.data import LABEL, numeric_reference, weights_of
from rareml.errors import RareMLError
from rareml.families import BLEND_STEPS, Context, blend, family, select
from rareml.features import Schema, to_frame, to_records
from rareml.model import MANIFEST_FILE, Member, Model, load_model, save_model
from rareml.tracking import log_split, run_name, setup_mlflow, ui_command, ui_url

log = logging.getLogger("03_serialize")
SHAP_SAMPLE = 2000


def explain(model: Model, X: pd.DataFrame, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Per-feature contributions to the log-odds (SHAP values for trees) on a sample of the test split."""
    sample = X.sample(min(SHAP_SAMPLE, len(X)), random_state=seed)
    return model.contributions(sample)[:, :-1], sample


def selection(y: np.ndarray, scores: dict[str, np.ndarray], tuned: dict, seed: int) -> dict:
    """Which families the model blends, with what weights, and why: each family's out-of-fold
    average precision with a bootstrap interval, and the blend's (`rareml.families.select`)."""
    weights = select(y, scores)
    blended = blend([scores[n] for n in weights], list(weights.values()))
    families = {}
    for name, p in scores.items():
        ap = metrics.evaluate(y, p, 0.5, n_boot=200, seed=seed)["average_precision"]
        entry = tuned["families"][name]
        families[name] = {"oof_average_precision": ap.value, "oof_average_precision_ci": [ap.low, ap.high],
                          "cv_average_precision": entry["cv"]["average_precision"], "trials": entry["trials"],
                          "weight": weights.get(name, 0.0)}
    kind = next(iter(weights)) if len(weights) == 1 else f"blend of {', '.join(weights)}"
    return {"chosen": kind, "weights": weights, "families": families,
            "oof_average_precision": metrics.average_precision(y, blended),
            "method": f"greedy ensemble selection with replacement (Caruana et al. 2004), at most {BLEND_STEPS} "
                      "steps, on out-of-fold average precision of the log-odds blend"}


def versions(members: list[dict]) -> dict[str, str]:
    """The versions of the packages the members' families load with ("xgboost==3.2.0" -> xgboost: 3.2.0)."""
    return dict(r.split("==", 1) for m in members for r in family(m["family"]).requirements())


def fairness(test: pd.DataFrame, y: np.ndarray, decision: np.ndarray, schema: Schema) -> dict:
    return {col: metrics.group_rates(y, decision, test[col].astype(object).to_numpy()) for col in schema.sensitive}


EXAMPLES = 25  # held-out records of each class shipped with the model for the GUI (and the Space)


def examples(test: pd.DataFrame, schema: Schema, seed: int) -> dict[str, list[dict]]:
    """A few test records of each outcome, as the API takes them."""
    pick = {name: test[test[LABEL] == label] for name, label in (("positive", 1), ("negative", 0))}
    return {name: to_records(rows.sample(min(EXAMPLES, len(rows)), random_state=seed), schema)
            for name, rows in pick.items()}


def figures(y, p, raw, curve, choice, contribs, sample, names) -> dict:
    values = [sample[n].to_numpy(dtype=float) if sample[n].dtype.kind == "f" else np.full(len(sample), np.nan)
              for n in names]
    return {"pr_roc.png": plots.pr_roc(y, p, choice),
            "reliability.png": plots.reliability_diagram(y, {"uncalibrated": raw, "calibrated": p}),
            "threshold.png": plots.threshold_plot(curve, choice),
            "confusion_matrix.png": plots.confusion(y, p, choice.threshold),
            "shap_importance.png": plots.shap_bar(names, np.abs(contribs).mean(axis=0)),
            "shap_beeswarm.png": plots.shap_beeswarm(names, contribs, values)}


def lineage(root: Path, config: Config, prepared: dict, train: pd.DataFrame) -> dict:
    """Where a model comes from: the champion it would replace, the data it saw, its time window."""
    window = None
    if config.time and config.time in train:
        times = train[config.time].dropna()
        window = {"column": config.time, "from": _plain(times.min()), "to": _plain(times.max())}
    return {"parent": registry.version_of(root, registry.CHAMPION), "window": window,
            "split": prepared["split"], "rows": prepared["rows"],
            "data_sha256": prepared["fingerprint"]["data_file_sha256"]}


def _plain(value: object) -> object:
    """A value as JSON holds it: numpy scalars as Python numbers, dates and the like as text."""
    value = value.item() if isinstance(value, np.generic) else value
    return value if isinstance(value, (int, float, str)) else str(value)


def log_to_mlflow(config: Config, tuned: dict, layout: Layout, manifest: dict, prepared: dict,
                  splits: dict[str, pd.DataFrame], aliases: list[str]) -> dict:
    """Log metrics, reports and the splits (refit on train, evaluated on test) to the tuning's parent
    run; register the model with its lineage as tags; give it the `aliases` it has locally
    (`challenger`, and `champion` for the first model).
    The pyfunc has no MLflow signature on purpose: MLflow's would refuse an int where the schema
    wants a float, and a missing value; the model's own schema (`to_frame`) checks its input."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = setup_mlflow(config.name)
    warnings.filterwarnings("ignore", module="mlflow")
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)  # "no signature": on purpose, see above
    try:
        active = mlflow.start_run(run_id=tuned["mlflow"]["parent_run_id"])
    except MlflowException:
        log.warning("tuning run %s not found at %s: logging to a new run", tuned["mlflow"]["parent_run_id"], uri)
        active = mlflow.start_run(run_name=run_name(config.name, "serialize"))
    with active as run_:
        for part, frame in splits.items():  # the tuning run has train already: MLflow keeps one copy
            log_split(frame, part, getattr(layout, part), config, prepared)
        test = manifest["metrics"]["test"]
        mlflow.log_metrics({f"test_{k}": v for k, v in test.items()})
        mlflow.log_metrics({f"test_{k}_ci_{end}": v for k, (lo, hi) in manifest["metrics"]["test_ci"].items()
                            for end, v in (("low", lo), ("high", hi))})
        mlflow.log_metrics({"threshold": manifest["threshold"]["threshold"],
                            **{f"calibration_{m}_{k}": v for m, s in manifest["calibration"]["cv"].items()
                               for k, v in s.items()}})
        mlflow.log_artifacts(str(layout.reports), "reports")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).parent / "rareml" / "mlflow_model.py"),
            artifacts={"model_dir": str(layout.model_dir)}, code_paths=[str(Path(__file__).parent / "rareml")],
            pip_requirements=[*(f"{k}=={v}" for k, v in versions(manifest["members"]).items()), f"scikit-learn=={sklearn.__version__}",
                              f"pandas=={pd.__version__}", f"mlflow=={mlflow.__version__}"])
        client = mlflow.MlflowClient()
        try:
            parent = client.get_model_version_by_alias(config.name, registry.CHAMPION).version
        except MlflowException:
            parent = None
        line = manifest["lineage"]
        version = mlflow.register_model(info.model_uri, config.name, tags={
            "model_version": manifest["model_version"], "lineage.parent_model_version": str(line["parent"]),
            "lineage.parent_mlflow_version": str(parent), "lineage.data_sha256": line["data_sha256"],
            "lineage.window": json.dumps(line["window"]), "lineage.split": line["split"],
            **tuned["mlflow"].get("tags", {})})
        for alias in aliases:
            client.set_registered_model_alias(config.name, alias, version.version)
    return {"tracking_uri": uri, "run_id": run_.info.run_id, "registered_model": config.name,
            "version": version.version, "aliases": aliases, "ui": ui_command(uri),
            "ui_url": ui_url(run_.info.experiment_id)}


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% intervals")
    parser.add_argument("--no-mlflow", action="store_true", help="write the model folder only")
    moves = parser.add_mutually_exclusive_group()
    moves.add_argument("--promote", nargs="?", const="", metavar="VERSION",
                       help="make VERSION (default: the challenger) the champion, and train nothing")
    moves.add_argument("--rollback", action="store_true", help="the previous champion serves again; train nothing")
    parser.add_argument("--registry", type=Path, default=None,
                        help="the artifacts folder whose models/ and aliases get the model (default: --artifacts)")
    args = parser.parse_args(argv)
    root = args.registry or args.artifacts
    if args.promote is not None or args.rollback:
        move_aliases(root, args.promote or None, args.rollback, not args.no_mlflow)
        return
    config, layout = load_config(args.config), Layout(args.artifacts)
    tuned = read_json(require(layout.tuned, "tune"))
    oof = pd.read_parquet(require(layout.oof, "tune"))
    prepared = read_json(require(layout.prepared, "prepare"))
    schema = Schema.from_dict(prepared["schema"])
    train, test = pd.read_parquet(require(layout.train, "prepare")), pd.read_parquet(require(layout.test, "prepare"))
    started = time.monotonic()
    entries = tuned["families"]
    y_oof = oof[LABEL].to_numpy()
    scores = {name: oof[name].to_numpy() for name in entries}
    chosen = selection(y_oof, scores, tuned, config.seed)
    X_train, y_train = to_frame(train, schema), train[LABEL].to_numpy()
    context = Context(schema=schema, spw_max=float((y_train == 0).sum() / max((y_train == 1).sum(), 1)),
                      seed=config.seed, rows=len(train))
    fits = {}  # every searched family is refitted: the chosen ones serve, all are reported on the test split
    for name, entry in entries.items():
        fam = family(name)
        fits[name] = fam.refit(entry["ensemble"], fam.prepare(X_train, y_train, weights_of(train)), context)
    members = [{"family": name, "weight": weight, "fitted": fits[name], "choice": entries[name]["choice"],
                "trials": [{"trial": m["trial"], "iterations": m["iterations"]} for m in entries[name]["ensemble"]]}
               for name, weight in chosen["weights"].items()]
    raw_oof = blend([scores[n] for n in chosen["weights"]], list(chosen["weights"].values()))
    calibrator, calibration_cv = select_calibrator(y_oof, raw_oof, seed=config.seed)
    p_oof = calibrator.predict(raw_oof)
    choice = metrics.choose_threshold(y_oof, p_oof, config.threshold)
    if not choice.met:
        log.warning("the %s floor cannot be met on out-of-fold scores: threshold set as close as possible",
                    config.threshold.metric)
    model = Model([Member(m["family"], m["weight"], family(m["family"]).scorer(m["fitted"], schema), {})
                   for m in members], calibrator, schema, {})
    X_test, y_test = to_frame(test, schema), test[LABEL].to_numpy()
    rows_test = model.rows(X_test)
    raw_test = model.raw_rows(rows_test)
    p_test = calibrator.predict(raw_test)
    for name, fitted in fits.items():  # each family alone on the test split: reported, never used to choose
        alone = metrics.evaluate(y_test, family(name).scorer(fitted, schema).raw(rows_test), 0.5, n_boot=200,
                                 seed=config.seed)["average_precision"]
        chosen["families"][name] |= {"test_average_precision": alone.value,
                                     "test_average_precision_ci": [alone.low, alone.high]}
    evaluation = metrics.evaluate(y_test, p_test, choice.threshold, n_boot=args.bootstrap, seed=config.seed)
    served, refit = members, None
    if config.refit_on_all:  # after the one test evaluation: the served model also learns from the test rows
        both = pd.concat([train, test])
        X_all, y_all = to_frame(both, schema), both[LABEL].to_numpy()
        served = [m | {"fitted": family(m["family"]).refit(entries[m["family"]]["ensemble"], family(m["family"]).prepare(
            X_all, y_all, weights_of(both)), context)} for m in members]
        refit = {"rows": len(both), "positives": int(y_all.sum()),
                 "note": "the served members were refitted on train + test after the one test evaluation, with the "
                         "same configuration, calibration and threshold; every metric here describes the train-only "
                         "fit, and the drift reference is its test-split scores"}
    contribs, sample = explain(model, X_test, config.seed)
    importance = dict(zip(schema.names, np.abs(contribs).mean(axis=0).round(6).tolist()))
    manifest = save_model(layout.model_dir, served, calibrator, examples=examples(test, schema, config.seed), manifest={
        "name": config.name, "selection": chosen, "refit_on_all": refit, "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "threshold": choice.to_dict() | {"policy": vars(config.threshold)},
        "metrics": {"test": {k: e.value for k, e in evaluation.items()},
                    "test_ci": {k: [e.low, e.high] for k, e in evaluation.items()},
                    "no_skill": metrics.no_skill(y_test), "cv": tuned["cv"],
                    "validation": metrics.at_threshold(y_oof, p_oof, choice.threshold) | {
                        "average_precision": metrics.average_precision(y_oof, p_oof),
                        "brier": metrics.brier(y_oof, p_oof), "ece": metrics.ece(y_oof, p_oof)},
                    "fairness": fairness(test, y_test, p_test >= choice.threshold, schema)},
        "calibration": {"method": calibrator.method, "cv": calibration_cv, "test_ece": metrics.ece(y_test, p_test)},
        "importance": dict(sorted(importance.items(), key=lambda kv: -kv[1])),
        # prediction drift is judged against the final model's scores on the test split (the out-of-fold
        # scores come from the fold models, distributed differently: PSI ~0.27 on the test split itself)
        "schema": schema.to_dict(), "reference": prepared["reference"] | {"__score__": numeric_reference(p_test)},
        "data": {"fingerprint": prepared["fingerprint"], "split": prepared["split"], "rows": prepared["rows"]},
        "lineage": lineage(root, config, prepared, train),
        "versions": {"python": platform.python_version(), "scikit-learn": sklearn.__version__,
                     "pandas": pd.__version__, **versions(members)},
    })
    reloaded = load_model(layout.model_dir).predict_proba(test)
    if refit is not None:  # what the saved folder must reproduce: the refitted members' scores
        p_test_served = Model([Member(m["family"], m["weight"], family(m["family"]).scorer(m["fitted"], schema), {})
                               for m in served], calibrator, schema, {}).predict_proba(test)
    else:
        p_test_served = p_test
    if not np.array_equal(reloaded, p_test_served):
        raise RareMLError("the saved model does not reproduce the in-memory predictions: not registering it")
    layout.reports.mkdir(parents=True, exist_ok=True)
    curve = metrics.threshold_curve(y_oof, p_oof, config.threshold)
    for name, fig in figures(y_test, p_test, raw_test, curve, choice, contribs, sample, schema.names).items():
        fig.savefig(layout.reports / name, dpi=110)
    write_json(layout.reports / "metrics.json", manifest["metrics"])
    local = registry.register(root, layout.model_dir)
    tracked = None if args.no_mlflow else log_to_mlflow(config, tuned, layout, manifest, prepared,
                                                        {"train": train, "test": test}, local["aliases"])
    write_json(layout.root / "serialized.json", {"model_dir": layout.model_dir, "model_version":
               manifest["model_version"], "aliases": local["aliases"], "seconds": time.monotonic() - started,
               "mlflow": tracked})
    ci = evaluation["average_precision"]
    log.info("model %s: test AP %.4f [%.4f, %.4f] (no skill %.4f), ROC-AUC %.4f, Brier %.4f, %s calibration, "
             "threshold %.4f (%s): precision %.3f, recall %.3f", manifest["model_version"], ci.value, ci.low,
             ci.high, np.mean(y_test), evaluation["roc_auc"].value, evaluation["brier"].value, calibrator.method,
             choice.threshold, choice.metric, evaluation["precision"].value, evaluation["recall"].value)
    print(f"\nmodel:        {layout.model_dir} (version {manifest['model_version']})\nreports:      {layout.reports}")
    budget = tuned.get("budget")
    if budget:
        late = time.time() - budget["ends_at"]
        print(f"time budget:  {budget['seconds']:.0f} s, {'exceeded by' if late > 0 else 'finished'} "
              f"{abs(late):.0f} s {'' if late > 0 else 'early'}".rstrip())
    champion = registry.version_of(root, registry.CHAMPION)
    if registry.CHAMPION in local["aliases"]:
        print("serving:      this model is the champion (the first one here): make serve serves it")
    else:
        print(f"serving:      this model is the challenger; the champion {champion} still serves.\n"
              f"              promote it by hand: make promote (make rollback undoes it)")
    if tracked:
        print(f"MLflow runs:  {tracked['tracking_uri']} (registered model {tracked['registered_model']} "
              f"v{tracked['version']}, aliases {', '.join(tracked['aliases'])})\nMLflow UI:    {tracked['ui']}\n"
              f"              then {tracked['ui_url']}")


def move_aliases(root: Path, version: str | None, back: bool, mlflow_too: bool) -> None:
    """make promote / make rollback: the local aliases, then MLflow's for the same models."""
    moved = registry.rollback(root) if back else registry.promote(root, version)
    if not moved["changed"]:
        print(f"{moved['champion']} is already the champion: nothing changed")
        return
    name = read_json(root / registry.MODELS / moved["champion"] / MANIFEST_FILE)["name"]
    moves = {registry.CHAMPION: moved["champion"], registry.PREVIOUS: moved["previous"]}
    in_mlflow = registry.sync_mlflow(name, moves) if mlflow_too else {}
    print(f"champion:     {moved['champion']} (was {moved['previous']}, now the alias previous)\n"
          f"serving:      a running API swaps to it within seconds; one started now serves it"
          + (f"\nMLflow:       {name} champion = v{in_mlflow['champion']}" if "champion" in in_mlflow else ""))


if __name__ == "__main__":
    run(main)
