"""Stage 2: tune XGBoost with Optuna by stratified K-fold CV on the training split.

Average precision is the search metric. Each fold holds out a slice of its training part for
early stopping, so the fold's validation scores (the out-of-fold predictions that calibration
and the threshold use later) come from a model that never saw them. Every trial is an MLflow
child run under one parent run. Writes artifacts/tuned.json and artifacts/oof.parquet.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import xgboost as xgb
from optuna.trial import TrialState as State
from sklearn.model_selection import RepeatedStratifiedKFold, train_test_split

from rareml import metrics
from rareml.artifacts import Layout, read_json, write_json
from rareml.cli import require, run, stage_parser
from rareml.config import load_config
from rareml.data import LABEL, weights_of
from rareml.errors import RareMLError
from rareml.features import Schema, to_frame
from rareml.model import ENCODINGS, base_params, dmatrix, mean_margin, raw_scores, train_booster
from rareml.tracking import log_split, run_name, setup_mlflow

log = logging.getLogger("02_tune")
MAX_ROUNDS, EARLY_STOPPING, ES_SHARE = 2000, 100, 0.1
# Up to this many training rows the final model averages the best few trials (at most
# ENSEMBLE_MAX, as many as maximise the out-of-fold average precision of their mean): on small
# data the single best CV score is partly luck, and each refit costs a second. Above it, one model.
ENSEMBLE_MAX, ENSEMBLE_MAX_ROWS = 5, 50_000
# What the final stage costs besides the refit, measured on this project's benchmark machine
# (2 cores): starting the process, calibration, SHAP values, plots, MLflow logging and registration
# (12 s left census at B=600 7 s over budget, with a 1,085-tree model); 1,000 bootstrap resamples.
FINAL_FIXED_S, BOOTSTRAP_S_PER_ROW = 18.0, 6e-5
# Known-good starting points, tried before TPE explores: XGBoost's defaults; a slower, subsampled
# configuration that is strong on most tabular data, with each categorical encoding; and trees grown
# leaf by leaf as LightGBM grows them (31 leaves, any depth), the family FLAML's best configurations
# came from on the benchmark datasets.
SLOW = {"grow_policy": "depthwise", "learning_rate": 0.05, "max_depth": 6, "min_child_weight": 1.0, "subsample": 0.8,
        "colsample_bytree": 0.8, "reg_lambda": 1.0, "reg_alpha": 0.001, "scale_pos_weight": 1.0}
LEAVES = {"grow_policy": "lossguide", "max_leaves": 31, "learning_rate": 0.1, "min_child_weight": 1.0,
          "subsample": 1.0, "colsample_bytree": 1.0, "reg_lambda": 1.0, "reg_alpha": 0.001, "scale_pos_weight": 1.0}
STARTS = [
    {"grow_policy": "depthwise", "learning_rate": 0.3, "max_depth": 6, "min_child_weight": 1.0, "subsample": 1.0,
     "colsample_bytree": 1.0, "reg_lambda": 1.0, "reg_alpha": 0.001, "scale_pos_weight": 1.0, "encoding": "native"},
    SLOW | {"encoding": "ordinal"},
    SLOW | {"encoding": "native"},
    LEAVES | {"encoding": "native"},
    LEAVES | {"learning_rate": 0.05, "subsample": 0.8, "colsample_bytree": 0.8, "encoding": "ordinal"},
]


@dataclass
class Candidate:
    """A complete trial, kept while it is among the best few."""

    number: int
    value: float
    params: dict
    encoding: str
    oof: np.ndarray
    rounds: list[int]


@dataclass
class Fold:
    fit: dict[str, xgb.DMatrix]  # by categorical encoding: training part of the fold, less...
    stop: dict[str, xgb.DMatrix]  # ...the early-stopping slice
    valid: dict[str, xgb.DMatrix]
    valid_idx: np.ndarray


def make_folds(X: pd.DataFrame, y: np.ndarray, k: int, repeats: int, seed: int,
               weight: np.ndarray | None = None) -> list[Fold]:
    """Built once and reused by every trial (same folds for all: fair comparison and pruning). Row
    weights, when given, weigh the fitting and early stopping; the validation scores are unweighted."""
    folds = []
    splitter = RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed)
    for train_idx, valid_idx in splitter.split(X, y):
        fit_idx, stop_idx = train_test_split(train_idx, test_size=ES_SHARE, stratify=y[train_idx],
                                             random_state=seed)
        parts = [{e: dmatrix(X.iloc[idx], y[idx], e, None if weight is None or idx is valid_idx else weight[idx])
                  for e in ENCODINGS} for idx in (fit_idx, stop_idx, valid_idx)]
        folds.append(Fold(*parts, valid_idx))
    return folds


# The search space: each number's range (a log scale for those spanning orders of magnitude).
RANGES = {"max_depth": (2, 10, False), "max_leaves": (4, 256, True), "learning_rate": (0.02, 0.3, True),
          "min_child_weight": (0.1, 100.0, True), "subsample": (0.5, 1.0, False),
          "colsample_bytree": (0.3, 1.0, False), "reg_lambda": (1e-3, 1000.0, True), "reg_alpha": (1e-3, 10.0, True)}
GROW_POLICIES = ("depthwise", "lossguide")
SEARCHED = ("learning_rate", "min_child_weight", "subsample", "colsample_bytree", "reg_lambda", "reg_alpha")


def suggest(trial: optuna.Trial, spw_max: float) -> tuple[dict, str]:
    """The search space (XGBoost parameters, categorical encoding). Trees grow level by level to a
    depth, or leaf by leaf to a number of leaves; scale_pos_weight runs from 1 (none) to the
    negative/positive ratio."""
    size = "max_depth" if trial.suggest_categorical("grow_policy", GROW_POLICIES) == "depthwise" else "max_leaves"
    for name in (size, *SEARCHED):
        low, high, log_scale = RANGES[name]
        if isinstance(low, int):
            trial.suggest_int(name, low, high, log=log_scale)
        else:
            trial.suggest_float(name, low, high, log=log_scale)
    trial.suggest_float("scale_pos_weight", 1.0, max(spw_max, 1.0 + 1e-9), log=True)
    trial.suggest_categorical("encoding", ENCODINGS)
    return xgb_params(trial.params), trial.params["encoding"]


def warm_start(model_dir: Path, spw_max: float) -> dict | None:
    """The search-space choices of the model in `model_dir` (its manifest, read as JSON), to try
    first: a retraining starts from the champion's configuration on the new data. Numbers are
    clipped into this search space (a champion of an older one); None, with a warning, when the
    manifest does not hold such a configuration (the search then starts as for a first model)."""
    manifest = read_json(require(model_dir / "manifest.json", "serialize"))
    params = manifest.get("params") if isinstance(manifest, dict) else None
    if not isinstance(params, dict) or params.get("grow_policy") not in GROW_POLICIES \
            or manifest.get("encoding") not in ENCODINGS:
        log.warning("--warm-start %s: no grow policy and encoding of this search in its manifest: not used", model_dir)
        return None
    size = "max_depth" if params["grow_policy"] == "depthwise" else "max_leaves"
    start = {"grow_policy": params["grow_policy"]}
    for name in (size, *SEARCHED, "scale_pos_weight"):
        value = params.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
            log.warning("--warm-start %s: %s is %r in its manifest: not used", model_dir, name, value)
            return None
        low, high = (1.0, max(spw_max, 1.0)) if name == "scale_pos_weight" else RANGES[name][:2]
        start[name] = type(low)(min(max(value, low), high))
    return start | {"encoding": manifest["encoding"]}


def xgb_params(chosen: dict) -> dict:
    """A trial's choices as XGBoost parameters: leaf-wise trees are bounded by leaves, not depth."""
    params = {k: v for k, v in chosen.items() if k != "encoding"}
    if params.get("grow_policy") == "lossguide":
        params["max_depth"] = 0
    return params


class Deadline(xgb.callback.TrainingCallback):
    """Stops boosting once the search's time is spent (the trial is then pruned, not scored)."""

    def __init__(self, at: Callable[[], float]) -> None:
        super().__init__()
        self.at, self.hit = at, False

    def after_iteration(self, model, epoch, evals_log) -> bool:
        self.hit = self.hit or time.time() > self.at()
        return self.hit


class Objective:
    """Mean CV average precision of one configuration; keeps the best trial's out-of-fold scores.

    The budget covers the whole pipeline up to `end` (epoch seconds): the search stops early
    enough to leave the final stage the time it will need (refit, bootstrap, reports)."""

    def __init__(self, folds: list[Fold], y: np.ndarray, seed: int, end: float, test_rows: int) -> None:
        import mlflow

        self.mlflow, self.folds, self.y, self.seed, self.end = mlflow, folds, y, seed, end
        self.spw_max = float((y == 0).sum() / max((y == 1).sum(), 1))
        self.best_value, self.best_oof, self.best_rounds, self.best_fit_s = -np.inf, None, [], 0.0
        self.final_fixed_s = FINAL_FIXED_S + test_rows * BOOTSTRAP_S_PER_ROW
        self.refits = ENSEMBLE_MAX if len(y) <= ENSEMBLE_MAX_ROWS else 1
        self.top: list[Candidate] = []  # the best complete trials, best first

    def reserve(self) -> float:
        """Seconds the final stage needs: fixed costs plus a refit on all training rows."""
        fit_rows = self.folds[0].fit["native"].num_row()
        return self.final_fixed_s + self.refits * self.best_fit_s * len(self.y) / fit_rows

    def search_deadline(self) -> float:
        return self.end - self.reserve()

    def __call__(self, trial: optuna.Trial) -> float:
        params, encoding = suggest(trial, self.spw_max)
        started = time.monotonic()
        with self.mlflow.start_run(run_name=f"trial-{trial.number:03d}", nested=True):
            self.mlflow.log_params(params | {"encoding": encoding, "trial": trial.number})
            state = "FAILED"
            try:
                value, oof, rounds, fit_s = self._cross_validate(trial, params, encoding)
                state = "COMPLETE"
            except optuna.TrialPruned:
                state = "PRUNED"
                raise
            finally:
                self.mlflow.set_tag("state", state)
                self.mlflow.log_metric("duration_s", time.monotonic() - started)
        if value > self.best_value:
            self.best_value, self.best_oof, self.best_rounds, self.best_fit_s = value, oof, rounds, fit_s
        self.top = sorted(self.top + [Candidate(trial.number, value, params, encoding, oof, rounds)],
                          key=lambda c: -c.value)[:ENSEMBLE_MAX]
        return value

    def ensemble(self) -> list[Candidate]:
        """The trials the final model averages: the best one, then, on small data, as many of the
        next best (same encoding) as raise the out-of-fold average precision of their mean."""
        same = [c for c in self.top if c.encoding == self.top[0].encoding][:self.refits]
        scores = [metrics.average_precision(self.y, mean_margin([c.oof for c in same[:k]]))
                  for k in range(1, len(same) + 1)]
        return same[:int(np.argmax(scores)) + 1]

    def _out_of_time(self, trial: optuna.Trial) -> None:
        """Once one trial is complete, a trial that would eat into the final stage's time is stopped."""
        if self.best_oof is not None and time.time() > self.search_deadline():
            trial.study.stop()
            raise optuna.TrialPruned("time budget spent")

    def _cross_validate(self, trial: optuna.Trial, params: dict,
                        encoding: str) -> tuple[float, np.ndarray, list[int], float]:
        oof_sum, oof_n, rounds, fit_s = np.zeros(len(self.y)), np.zeros(len(self.y)), [], []
        per_fold = {"average_precision": [], "roc_auc": [], "log_loss": [], "brier": []}
        for k, fold in enumerate(self.folds):
            self._out_of_time(trial)
            stop = Deadline(self.search_deadline)
            started = time.monotonic()
            booster = train_booster(base_params(self.seed) | params, fold.fit[encoding], MAX_ROUNDS,
                                    fold.stop[encoding], EARLY_STOPPING,
                                    callbacks=[stop] if self.best_oof is not None else None)
            fit_s.append(time.monotonic() - started)
            self._out_of_time(trial)
            p, y = raw_scores(booster, fold.valid[encoding]), self.y[fold.valid_idx]
            oof_sum[fold.valid_idx] += p
            oof_n[fold.valid_idx] += 1
            rounds.append(booster.best_iteration + 1)
            for name, values in per_fold.items():
                values.append(getattr(metrics, name)(y, p))
                self.mlflow.log_metric(f"fold_{name}", values[-1], step=k)
            trial.report(float(np.mean(per_fold["average_precision"])), k)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after fold {k}")
        for name, values in per_fold.items():
            self.mlflow.log_metrics({f"cv_{name}_mean": float(np.mean(values)), f"cv_{name}_std": float(np.std(values))})
        self.mlflow.log_metric("n_estimators", float(np.mean(rounds)))
        trial.set_user_attr("cv", {n: float(np.mean(v)) for n, v in per_fold.items()})
        oof = oof_sum / oof_n  # each row's out-of-fold score, averaged over the repeats
        return float(np.mean(per_fold["average_precision"])), oof, rounds, float(np.mean(fit_s))


def param_importance(study: optuna.Study) -> dict[str, float]:
    """Optuna's importance of each searched parameter (fANOVA over the finished trials); empty
    when too few trials finished to judge."""
    import warnings

    if len([t for t in study.trials if t.state.is_finished() and t.value is not None]) < 3:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)).items()}
    except (RuntimeError, ValueError) as exc:
        log.warning("no parameter importance: %s", exc)
        return {}


def study_plots(study: optuna.Study) -> dict:
    """Optuna's history and parameter-importance figures (matplotlib), for the parent run and the
    report."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    figures = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        figures["optuna_history.png"] = ovm.plot_optimization_history(study).figure
        if len([t for t in study.trials if t.state.is_finished() and t.value is not None]) >= 3:
            try:
                figures["optuna_param_importances.png"] = ovm.plot_param_importances(study).figure
            except (RuntimeError, ValueError) as exc:
                log.warning("no parameter-importance plot: %s", exc)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--time-budget", type=float, default=600,
                        help="seconds for the pipeline from --started-at to a serialized model (default 600)")
    parser.add_argument("--started-at", type=float, default=None,
                        help="epoch seconds the budget counts from (make all: before prepare; default: now)")
    parser.add_argument("--n-trials", type=int, default=None, help="stop after this many trials (default: budget)")
    parser.add_argument("--warm-start", type=Path, metavar="MODEL_DIR",
                        help="try the parameters of this model first (06_retrain.py: the champion's)")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="an MLflow tag for the run and the registered model (06_retrain.py: the alert)")
    args = parser.parse_args(argv)
    tags = dict(t.partition("=")[::2] for t in args.tag)
    config, layout = load_config(args.config), Layout(args.artifacts)
    prepared = read_json(require(layout.prepared, "prepare"))
    schema = Schema.from_dict(prepared["schema"])
    train = pd.read_parquet(require(layout.train, "prepare"))
    X, y = to_frame(train, schema), train[LABEL].to_numpy()
    started, end = time.monotonic(), (args.started_at or time.time()) + args.time_budget
    k, repeats = config.folds_for(len(train)), config.repeats_for(len(train))
    folds = make_folds(X, y, k, repeats, config.seed, weights_of(train))
    objective = Objective(folds, y, config.seed, end, test_rows=prepared["rows"]["test"])
    sampler = optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=8)
    # after 4 complete trials, a trial whose running mean falls below the median at a fold stops there
    pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner,
                                study_name=f"{config.name}-xgboost")
    first = [w for w in [warm_start(args.warm_start, objective.spw_max) if args.warm_start else None] if w]
    starts = first + [s for s in STARTS if s not in first]
    for start in starts[:args.n_trials]:  # with fewer trials allowed than starts, enqueue only those that run
        study.enqueue_trial(start)
    import mlflow

    uri = setup_mlflow(config.name)
    with mlflow.start_run(run_name=run_name(config.name, "tune")) as parent:
        mlflow.log_params({"config": config.path.name, "cv_folds": k, "cv_repeats": repeats, "seed": config.seed,
                           "time_budget_s": args.time_budget, "n_trials_max": args.n_trials,
                           "train_rows": len(train), "train_positives": int(y.sum())})
        mlflow.set_tags({"stage": "tune", **{f"fingerprint.{k}": v for k, v in prepared["fingerprint"].items()},
                         **tags})
        mlflow.log_artifact(str(config.path), "config")
        log_split(train, "train", layout.train, config, prepared)  # the test split is logged by 03, which uses it
        study.optimize(objective, n_trials=args.n_trials, catch=(),
                       show_progress_bar=sys.stderr.isatty())
        if objective.best_oof is None:
            raise RareMLError("no trial completed within the time budget: raise BUDGET (--time-budget)")
        best = study.best_trial
        members = objective.ensemble()
        oof = mean_margin([m.oof for m in members])
        if len(members) > 1:
            log.info("the final model averages trials %s: out-of-fold average precision %.4f, against %.4f "
                     "for the best alone", [m.number for m in members], metrics.average_precision(y, oof),
                     metrics.average_precision(y, members[0].oof))
        mlflow.log_metrics({"ensemble_size": len(members), "oof_average_precision": metrics.average_precision(y, oof)})
        ran = study.get_trials(deepcopy=False, states=(State.COMPLETE, State.PRUNED, State.FAIL))
        states = pd.Series([t.state.name for t in ran]).value_counts().to_dict()  # not the starts left waiting
        mlflow.log_params({f"best_{k}": v for k, v in best.params.items()})
        mlflow.log_metrics({"best_cv_average_precision": best.value, "tune_seconds": time.monotonic() - started,
                            **{f"best_cv_{k}": v for k, v in best.user_attrs["cv"].items()},
                            **{f"trials_{k.lower()}": v for k, v in states.items()}})
        layout.tuning.mkdir(parents=True, exist_ok=True)
        for name, figure in study_plots(study).items():
            mlflow.log_figure(figure, f"tuning/{name}")
            figure.savefig(layout.tuning / name, dpi=110, bbox_inches="tight")
        history = study.trials_dataframe(attrs=("number", "value", "state", "duration", "params"))
        history["duration"] = history["duration"].dt.total_seconds()
        mlflow.log_table(history, "tuning/trials.json")
        history.to_csv(layout.tuning / "trials.csv", index=False)
    pd.DataFrame({LABEL: y, "score": oof}, index=train.index).to_parquet(layout.oof)
    write_json(layout.tuned, {
        "params": base_params(config.seed) | xgb_params(best.params),
        "encoding": best.params["encoding"],
        "n_estimators": round(float(np.mean(objective.best_rounds))),
        "fold_rounds": objective.best_rounds,
        "cv": best.user_attrs["cv"], "best_trial": best.number, "trials": states,
        "ensemble": [{"trial": m.number, "cv_average_precision": m.value, "params": base_params(config.seed) | m.params,
                      "n_estimators": round(float(np.mean(m.rounds)))} for m in members],
        "oof_average_precision": metrics.average_precision(y, oof),
        "param_importance": param_importance(study),
        "search": {"ranges": {k: list(v[:2]) + ["log" if v[2] else "linear"] for k, v in RANGES.items()},
                   "grow_policies": list(GROW_POLICIES), "encodings": list(ENCODINGS), "starts": starts[:args.n_trials],
                   "scale_pos_weight": [1.0, objective.spw_max], "cv_folds": k, "cv_repeats": repeats,
                   "early_stopping_share": ES_SHARE, "early_stopping_rounds": EARLY_STOPPING, "max_rounds": MAX_ROUNDS,
                   "metric": "average_precision", "sampler": "TPE (8 startup trials)",
                   "pruner": "median (from the first fold, after 4 complete trials)"},
        "budget": {"seconds": args.time_budget, "ends_at": end, "reserved_for_final_stage_s": objective.reserve()},
        "mlflow": {"tracking_uri": uri, "experiment": config.name, "parent_run_id": parent.info.run_id, "tags": tags},
    })
    log.info("best trial %d: CV average precision %.4f (%s) in %.0f s", best.number, best.value,
             ", ".join(f"{n} {k.lower()}" for k, n in states.items()), time.monotonic() - started)


if __name__ == "__main__":
    run(main)
