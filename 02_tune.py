"""Stage 2: tune each model family (the config's `[model] families`) with Optuna by stratified
K-fold CV on the training split.

Average precision is the search metric. Every family sees the same folds; each fold holds out a
slice of its training part for early stopping, so the fold's validation scores (the out-of-fold
predictions that selection, blending, calibration and the threshold use later) come from a model
that never saw them. Every trial is an MLflow child run under one parent run, tagged with its
family. Writes artifacts/tuned.json and artifacts/oof.parquet (one column of out-of-fold scores
per family).

A retraining (--warm-start, 06_retrain.py) searches the families of the model it starts from (the
champion's), each from its configuration, with the whole budget; `make all` searches the config's.

How the time is shared: the families are searched one after another, cheapest first (the order of
`rareml.families.REGISTRY`); each gets an equal share of the search time still left when it starts,
and time a family does not use (a small space stops at its `max_trials`) passes to the next ones.
The search as a whole stops early enough to leave the final stage the time it will need: a refit of
every family (each may be in the blend), the bootstrap and the reports.
"""
from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState as State
from sklearn.model_selection import RepeatedStratifiedKFold, train_test_split

from rareml import metrics
from rareml.artifacts import Layout, read_json, write_json
from rareml.cli import require, run, stage_parser
from rareml.config import load_config
from rareml.data import LABEL, weights_of
from rareml.errors import RareMLError
from rareml.families import REGISTRY, Context, Family, blend, family
from rareml.features import Schema, to_frame
from rareml.model import members_of
from rareml.tracking import log_split, run_name, setup_mlflow

log = logging.getLogger("02_tune")
ES_SHARE = 0.1
# Up to this many training rows a family's final model averages its best few trials (at most
# ENSEMBLE_MAX, as many as maximise the out-of-fold average precision of their mean) when the family
# can (`Family.averages_trials`): on small data the single best CV score is partly luck, and each
# refit costs a second. Above it, one model.
ENSEMBLE_MAX, ENSEMBLE_MAX_ROWS = 5, 50_000
# What the final stage costs besides the refits, measured on this project's benchmark machine
# (2 cores): starting the process, calibration, SHAP values, plots, MLflow logging and registration
# (12 s left census at B=600 7 s over budget, with a 1,085-tree model); 1,000 bootstrap resamples.
FINAL_FIXED_S, BOOTSTRAP_S_PER_ROW = 18.0, 6e-5


@dataclass
class Candidate:
    """A complete trial, kept while it is among the best few."""

    number: int
    value: float
    choice: dict
    oof: np.ndarray
    iterations: list


@dataclass
class Fold:
    """Row positions of one fold: its training part less the early-stopping slice, the slice, the validation part."""

    fit_idx: np.ndarray
    stop_idx: np.ndarray
    valid_idx: np.ndarray


def make_folds(y: np.ndarray, k: int, repeats: int, seed: int) -> list[Fold]:
    """Built once and used by every family and trial (same folds for all: fair comparison and pruning)."""
    folds = []
    splitter = RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed)
    for train_idx, valid_idx in splitter.split(np.zeros(len(y)), y):
        fit_idx, stop_idx = train_test_split(train_idx, test_size=ES_SHARE, stratify=y[train_idx],
                                             random_state=seed)
        folds.append(Fold(fit_idx, stop_idx, valid_idx))
    return folds


def fold_data(fam: Family, X: pd.DataFrame, y: np.ndarray, folds: list[Fold],
              weight: np.ndarray | None = None) -> list[tuple]:
    """Each fold's (fit, stop, valid) parts as the family takes them. Row weights, when given, weigh
    the fitting and early stopping; the validation scores are unweighted."""
    def part(idx: np.ndarray, weighted: bool = True) -> object:
        return fam.prepare(X.iloc[idx], y[idx], weight[idx] if weighted and weight is not None else None)

    return [(part(f.fit_idx), part(f.stop_idx), part(f.valid_idx, weighted=False)) for f in folds]


@dataclass
class Budget:
    """The time of the whole pipeline up to `end` (epoch seconds), and what the final stage will
    need of it: fixed costs plus each family's refit on all training rows (estimated from its fold fits)."""

    end: float
    fixed_s: float
    refit_s: dict = field(default_factory=dict)

    def reserve(self) -> float:
        return self.fixed_s + sum(self.refit_s.values())

    def search_deadline(self) -> float:
        return self.end - self.reserve()


class Objective:
    """Mean CV average precision of one family's configuration; keeps its best few trials' out-of-fold scores."""

    def __init__(self, fam: Family, data: list[tuple], folds: list[Fold], y: np.ndarray, context: Context,
                 budget: Budget, share_end: float) -> None:
        import mlflow

        self.mlflow, self.fam, self.data, self.folds, self.y, self.context = mlflow, fam, data, folds, y, context
        self.budget, self.share_end = budget, share_end
        self.best_value = -np.inf
        self.best: Candidate | None = None
        self.refits = ENSEMBLE_MAX if fam.averages_trials and len(y) <= ENSEMBLE_MAX_ROWS else 1
        self.top: list[Candidate] = []  # the best complete trials, best first

    def deadline(self) -> float:
        """This family's share of the search, and never into the final stage's time."""
        return min(self.share_end, self.budget.search_deadline())

    def __call__(self, trial: optuna.Trial) -> float:
        choice = self.fam.suggest(trial, self.context)
        started = time.monotonic()
        with self.mlflow.start_run(run_name=f"{self.fam.name}-trial-{trial.number:03d}", nested=True):
            self.mlflow.set_tag("family", self.fam.name)
            self.mlflow.log_params(choice | {"family": self.fam.name, "trial": trial.number})
            state = "FAILED"
            try:
                value, oof, iterations = self._cross_validate(trial, choice)
                state = "COMPLETE"
            except optuna.TrialPruned:
                state = "PRUNED"
                raise
            finally:
                self.mlflow.set_tag("state", state)
                self.mlflow.log_metric("duration_s", time.monotonic() - started)
        candidate = Candidate(trial.number, value, choice, oof, iterations)
        if value > self.best_value:
            self.best_value, self.best = value, candidate
        self.top = sorted(self.top + [candidate], key=lambda c: -c.value)[:ENSEMBLE_MAX]
        return value

    def ensemble(self) -> list[Candidate]:
        """The trials the family's final model averages: the best one, then, on small data and when
        the family averages, as many of the next best (of the same `Family.structure`) as raise the
        out-of-fold average precision of their mean."""
        first = self.fam.structure(self.top[0].choice)
        same = [c for c in self.top if self.fam.structure(c.choice) == first][:self.refits]
        scores = [metrics.average_precision(self.y, blend([c.oof for c in same[:k]])) for k in range(1, len(same) + 1)]
        return same[:int(np.argmax(scores)) + 1]

    def _out_of_time(self, trial: optuna.Trial) -> None:
        """Once one trial is complete, a trial past the family's share of the time is stopped."""
        if self.best is not None and time.time() > self.deadline():
            trial.study.stop()
            raise optuna.TrialPruned("time budget spent")

    def _cross_validate(self, trial: optuna.Trial, choice: dict) -> tuple[float, np.ndarray, list]:
        oof_sum, oof_n, iterations, fit_s = np.zeros(len(self.y)), np.zeros(len(self.y)), [], []
        per_fold = {"average_precision": [], "roc_auc": [], "log_loss": [], "brier": []}
        for k, (fold, (fit, stop, valid)) in enumerate(zip(self.folds, self.data)):
            self._out_of_time(trial)
            started = time.monotonic()
            fitted, kept = self.fam.fit(choice, fit, stop, self.context,
                                        deadline=self.deadline if self.best is not None else None)
            fit_s.append(time.monotonic() - started)
            self._out_of_time(trial)
            p, y = self.fam.scores(fitted, valid), self.y[fold.valid_idx]
            oof_sum[fold.valid_idx] += p
            oof_n[fold.valid_idx] += 1
            iterations.append(kept)
            for name, values in per_fold.items():
                values.append(getattr(metrics, name)(y, p))
                self.mlflow.log_metric(f"fold_{name}", values[-1], step=k)
            trial.report(float(np.mean(per_fold["average_precision"])), k)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after fold {k}")
        for name, values in per_fold.items():
            self.mlflow.log_metrics({f"cv_{name}_mean": float(np.mean(values)), f"cv_{name}_std": float(np.std(values))})
        if all(i is not None for i in iterations):
            self.mlflow.log_metric("iterations", float(np.mean(iterations)))
        trial.set_user_attr("cv", {n: float(np.mean(v)) for n, v in per_fold.items()})
        value = float(np.mean(per_fold["average_precision"]))
        if value > self.best_value:  # the refit on all rows costs about a fold fit, scaled by rows
            rows = len(self.folds[0].fit_idx)
            self.budget.refit_s[self.fam.name] = self.refits * float(np.mean(fit_s)) * len(self.y) / rows
        return value, oof_sum / oof_n, iterations  # each row's out-of-fold score, averaged over the repeats


def warm_starts(model_dir: Path, context: Context) -> dict[str, dict]:
    """Each family's choices in the model of `model_dir` (its manifest, read as JSON), to try first:
    a retraining starts from the champion's configuration on the new data, numbers clipped into this
    search space. A family whose choices this search cannot use is skipped with a warning (its search
    then starts as for a first model)."""
    manifest = read_json(require(model_dir / "manifest.json", "serialize"))
    starts = {}
    try:
        members = members_of(manifest) if isinstance(manifest, dict) else []
    except (KeyError, TypeError):
        members = []
    for member in members:
        name = member.get("family") if isinstance(member, dict) else None
        try:
            start = family(name).warm_start(member, context)
        except (RareMLError, ValueError) as exc:
            log.warning("--warm-start %s: %s: %s in its manifest: not used", model_dir, name, exc)
            continue
        if start is None:
            log.warning("--warm-start %s: %s: no configuration of this search in its manifest: not used", model_dir, name)
        else:
            starts[name] = start
    if not starts:
        log.warning("--warm-start %s: nothing in its manifest this search can use: not used", model_dir)
    return starts


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


def search_family(fam: Family, X: pd.DataFrame, y: np.ndarray, folds: list[Fold], weight: np.ndarray | None,
                  context: Context, budget: Budget, share_end: float, n_trials: int | None, warm: dict | None,
                  study_name: str, tuning: Path) -> tuple[dict, np.ndarray]:
    """One family's Optuna study (its trials are MLflow child runs of the active run): its entry in
    tuned.json, and the out-of-fold scores of its final model."""
    import mlflow

    started, started_at = time.monotonic(), time.time()
    objective = Objective(fam, fold_data(fam, X, y, folds, weight), folds, y, context, budget, share_end)
    sampler = optuna.samplers.TPESampler(seed=context.seed, n_startup_trials=8)
    # after 4 complete trials, a trial whose running mean falls below the median at a fold stops there
    pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner, study_name=study_name)
    caps = [n for n in (n_trials, fam.max_trials) if n is not None]
    cap = min(caps) if caps else None
    first = [warm] if warm else []
    starts = first + [s for s in fam.starts(context) if s not in first]
    for start in starts[:cap]:  # with fewer trials allowed than starts, enqueue only those that run
        study.enqueue_trial(start)
    study.optimize(objective, n_trials=cap, catch=(), show_progress_bar=sys.stderr.isatty())
    if objective.best is None:
        raise RareMLError(f"no {fam.name} trial completed within the time budget: raise BUDGET (--time-budget)")
    members, best = objective.ensemble(), study.best_trial
    oof = blend([m.oof for m in members])
    if len(members) > 1:
        log.info("%s: the final model averages trials %s: out-of-fold average precision %.4f, against %.4f for the "
                 "best alone", fam.name, [m.number for m in members], metrics.average_precision(y, oof),
                 metrics.average_precision(y, members[0].oof))
    ran = study.get_trials(deepcopy=False, states=(State.COMPLETE, State.PRUNED, State.FAIL))
    states = pd.Series([t.state.name for t in ran]).value_counts().to_dict()  # not the starts left waiting
    folder = tuning / fam.name
    folder.mkdir(parents=True, exist_ok=True)
    for name, figure in study_plots(study).items():
        mlflow.log_figure(figure, f"tuning/{fam.name}/{name}")
        figure.savefig(folder / name, dpi=110, bbox_inches="tight")
    history = study.trials_dataframe(attrs=("number", "value", "state", "duration", "params"))
    history["duration"] = history["duration"].dt.total_seconds()
    mlflow.log_table(history, f"tuning/{fam.name}/trials.json")
    history.to_csv(folder / "trials.csv", index=False)
    oof_ap = metrics.average_precision(y, oof)
    mlflow.log_metrics({f"{fam.name}_best_cv_{k}": v for k, v in best.user_attrs["cv"].items()} | {
        f"{fam.name}_oof_average_precision": oof_ap, f"{fam.name}_ensemble_size": len(members),
        f"{fam.name}_seconds": time.monotonic() - started, **{f"{fam.name}_trials_{k.lower()}": v for k, v in states.items()}})

    def mean(iterations: list) -> int | None:
        return None if any(i is None for i in iterations) else round(float(np.mean(iterations)))

    entry = {"choice": objective.best.choice, "iterations": mean(objective.best.iterations),
             "fold_iterations": objective.best.iterations, "cv": best.user_attrs["cv"], "best_trial": best.number,
             "trials": states, "ensemble": [{"trial": m.number, "cv_average_precision": m.value, "choice": m.choice,
                                             "iterations": mean(m.iterations)} for m in members],
             "oof_average_precision": oof_ap, "param_importance": param_importance(study),
             "search": fam.search(context) | {"starts": starts[:cap], "max_trials": fam.max_trials},
             "seconds": time.monotonic() - started,
             "time": {"started_at": started_at, "share_ends_at": share_end, "ended_at": time.time()}}
    log.info("%s: best trial %d, CV average precision %.4f (%s) in %.0f s", fam.name, best.number, best.value,
             ", ".join(f"{n} {k.lower()}" for k, n in states.items()), entry["seconds"])
    return entry, oof


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--time-budget", type=float, default=600,
                        help="seconds for the pipeline from --started-at to a serialized model (default 600)")
    parser.add_argument("--started-at", type=float, default=None,
                        help="epoch seconds the budget counts from (make all: before prepare; default: now)")
    parser.add_argument("--n-trials", type=int, default=None,
                        help="stop each family after this many trials (default: budget)")
    parser.add_argument("--warm-start", type=Path, metavar="MODEL_DIR",
                        help="try the configurations of this model first (06_retrain.py: the champion's)")
    parser.add_argument("--families", default=None, metavar="A,B",
                        help="the model families to search (default: those of --warm-start's model, else the "
                             "config's [model] families)")
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
    folds = make_folds(y, k, repeats, config.seed)
    context = Context(schema=schema, spw_max=float((y == 0).sum() / max((y == 1).sum(), 1)), seed=config.seed,
                      rows=len(train))
    budget = Budget(end, FINAL_FIXED_S + prepared["rows"]["test"] * BOOTSTRAP_S_PER_ROW)
    warm = warm_starts(args.warm_start, context) if args.warm_start else {}
    # a retraining (--warm-start) searches the families of the model it starts from, with the whole budget;
    # `make all` searches the config's
    names = [n.strip() for n in args.families.split(",") if n.strip()] if args.families else \
        list(warm) or list(config.families)
    families = sorted((family(n) for n in dict.fromkeys(names)), key=lambda f: list(REGISTRY).index(f.name))
    import mlflow

    uri = setup_mlflow(config.name)
    entries, oofs = {}, {}
    with mlflow.start_run(run_name=run_name(config.name, "tune")) as parent:
        mlflow.log_params({"config": config.path.name, "cv_folds": k, "cv_repeats": repeats, "seed": config.seed,
                           "time_budget_s": args.time_budget, "n_trials_max": args.n_trials,
                           "families": ",".join(f.name for f in families),
                           "train_rows": len(train), "train_positives": int(y.sum())})
        mlflow.set_tags({"stage": "tune", **{f"fingerprint.{k}": v for k, v in prepared["fingerprint"].items()},
                         **tags})
        mlflow.log_artifact(str(config.path), "config")
        log_split(train, "train", layout.train, config, prepared)  # the test split is logged by 03, which uses it
        for i, fam in enumerate(families):
            now = time.time()  # an equal share of what is left; what a family leaves passes to the next
            share_end = now + max(budget.search_deadline() - now, 0.0) / (len(families) - i)
            entries[fam.name], oofs[fam.name] = search_family(
                fam, X, y, folds, weights_of(train), context, budget, share_end, args.n_trials, warm.get(fam.name),
                f"{config.name}-{fam.name}", layout.tuning)
        best = max(entries, key=lambda n: entries[n]["oof_average_precision"])
        totals = dict(sum((Counter(e["trials"]) for e in entries.values()), Counter()))
        mlflow.log_metrics({"best_cv_average_precision": entries[best]["cv"]["average_precision"],
                            "tune_seconds": time.monotonic() - started,
                            **{f"trials_{k.lower()}": v for k, v in totals.items()}})
        mlflow.set_tag("best_family", best)
    pd.DataFrame({LABEL: y, **oofs}, index=train.index).to_parquet(layout.oof)
    write_json(layout.tuned, {
        "families": entries, "best_family": best, "cv": entries[best]["cv"], "trials": totals,
        "search": {"families": [f.name for f in families], "cv_folds": k, "cv_repeats": repeats,
                   "early_stopping_share": ES_SHARE, "metric": "average_precision", "sampler": "TPE (8 startup trials)",
                   "pruner": "median (from the first fold, after 4 complete trials)",
                   "share": "families in turn, cheapest first, each an equal share of the search time left"},
        "budget": {"seconds": args.time_budget, "ends_at": end, "reserved_for_final_stage_s": budget.reserve()},
        "mlflow": {"tracking_uri": uri, "experiment": config.name, "parent_run_id": parent.info.run_id, "tags": tags},
    })
    log.info("searched %s in %.0f s: best family %s, out-of-fold average precision %.4f",
             ", ".join(entries), time.monotonic() - started, best, entries[best]["oof_average_precision"])


if __name__ == "__main__":
    run(main)
