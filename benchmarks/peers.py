"""Benchmark: rareml against peer tools (logistic regression, default XGBoost and LightGBM, FLAML,
AutoGluon) on one fixed stratified 80/20 split of a shipped dataset, same budget for the AutoML tools.

    .venv-bench/bin/python benchmarks/peers.py --dataset credit_data --budget 120 [--only flaml,rareml]

Runs in its own environment (.venv-bench, from benchmarks/requirements-peers.txt: install torch first).
rareml itself runs as `make all` in its own .venv, on the same train/test files, with a temporary
MLflow database. Every contender is scored on the test rows by average precision, ROC-AUC and Brier
score, each with a paired bootstrap 95% interval (the same resamples for every contender).
Writes benchmarks/results/peers-<dataset>-B<budget>.json and .md. A benchmark, not a test: figures
on a shared machine vary; compare runs made side by side.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import tomllib
import traceback
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import metrics as skm
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("census_income_kdd", "credit_data", "resume_callback")
CONTENDERS = ("logreg", "xgboost", "lightgbm", "flaml", "autogluon", "rareml", "rareml-linear", "rareml-xgboost")
RAREML_PY = ROOT / ".venv" / "bin" / "python"
METRICS = ("average_precision", "roc_auc", "brier")
VERSIONS = ("flaml", "autogluon.tabular", "lightgbm", "xgboost-cpu", "xgboost", "catboost", "torch",
            "scikit-learn", "pandas", "numpy", "pyarrow")


# ---------------------------------------------------------------- data and split

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def frame_sha256(frame: pd.DataFrame) -> str:
    return sha256_bytes(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())


def load_dataset(name: str) -> tuple[dict, Path, pd.DataFrame, np.ndarray, list[str]]:
    """The shipped config, data path, raw frame (rows with a target), 0/1 labels and feature columns."""
    config = tomllib.loads((ROOT / "configs" / f"{name}.toml").read_text(encoding="utf-8"))
    path = ROOT / "data" / f"{name}.parquet"
    raw = pd.read_parquet(path)
    raw = raw.loc[raw[config["target"]].notna()]
    target = raw[config["target"]]
    y = (target == config["positive"]).to_numpy()
    if not y.any():  # same fallback as rareml: "yes" vs True, 1 vs "1"
        y = (target.astype(str) == str(config["positive"])).to_numpy()
    # `time` is ignored as a split rule here; the column is dropped from the features like `drop`
    excluded = set(config.get("drop", [])) | {config["target"]} | ({config["time"]} if "time" in config else set())
    features = [c for c in raw.columns if c not in excluded]
    return config, path, raw, y.astype(int), features


def typed_features(train: pd.DataFrame, test: pd.DataFrame, features: list[str],
                   declared: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, list[str], list[str]]:
    """Features as the peers get them: numerics as float, the rest (and the config's `categorical`)
    as pandas categories with the training levels (a level unseen in training becomes missing)."""
    cats = [c for c in features if c in declared or not pd.api.types.is_numeric_dtype(train[c])
            or pd.api.types.is_bool_dtype(train[c])]
    nums = [c for c in features if c not in cats]
    xtr, xte = {}, {}
    for c in features:
        if c in nums:
            xtr[c], xte[c] = train[c].astype(float), test[c].astype(float)
        else:
            as_str = [s.astype(object).astype(str).where(s.notna()) for s in (train[c], test[c])]
            levels = sorted(as_str[0].dropna().unique())
            xtr[c] = pd.Series(pd.Categorical(as_str[0], categories=levels), index=train.index)
            xte[c] = pd.Series(pd.Categorical(as_str[1], categories=levels), index=test.index)
    return pd.DataFrame(xtr), pd.DataFrame(xte), cats, nums


# ---------------------------------------------------------------- metrics

def ranking_metrics(y_sorted: np.ndarray, ends: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AP and ROC-AUC for each row of weights `w` (resamples x rows, in descending-score order);
    `ends` = last position of each distinct score. With unit weights these equal scikit-learn's."""
    tp = np.cumsum(w * y_sorted, axis=1)[:, ends]
    fp = np.cumsum(w * (1 - y_sorted), axis=1)[:, ends]
    pos, neg = tp[:, -1:], fp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (tp + fp)
        ap = np.sum(np.diff(tp, axis=1, prepend=0) * precision, axis=1) / pos[:, 0]
        tpr, fpr = tp / pos, fp / neg
        auc = np.sum(np.diff(fpr, axis=1, prepend=0) * (tpr + np.c_[np.zeros(len(tpr)), tpr[:, :-1]]) / 2, axis=1)
    return ap, auc


def bootstrap_weights(n: int, n_boot: int, seed: int, chunk: int = 50):
    """Resamples of the test rows as count vectors, in chunks; the same for every contender."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, (b, n)) + (np.arange(b) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(float)


def evaluate(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int) -> dict:
    """Point values by sklearn.metrics; 95% percentile intervals from `n_boot` paired resamples."""
    p = np.asarray(p, float)
    if p.shape != y.shape or not np.all(np.isfinite(p)):
        raise ValueError(f"bad predictions: shape {p.shape} for {y.shape} labels, finite: {np.isfinite(p).all()}")
    point = {"average_precision": skm.average_precision_score(y, p), "roc_auc": skm.roc_auc_score(y, p),
             "brier": skm.brier_score_loss(y, p)}
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order].astype(float), p[order]
    ends = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]
    check_ap, check_auc = ranking_metrics(ys, ends, np.ones((1, len(ys))))
    assert abs(check_ap[0] - point["average_precision"]) < 1e-9 and abs(check_auc[0] - point["roc_auc"]) < 1e-9
    draws = {k: [] for k in METRICS}
    se = (ps - ys) ** 2
    for w in bootstrap_weights(len(y), n_boot, seed):
        w = w[:, order]
        ap, auc = ranking_metrics(ys, ends, w)
        draws["average_precision"].append(ap)
        draws["roc_auc"].append(auc)
        draws["brier"].append(w @ se / w.sum(axis=1))
    out = {}
    for k in METRICS:
        low, high = np.nanpercentile(np.concatenate(draws[k]), [2.5, 97.5]) if n_boot else (np.nan, np.nan)
        out[k] = {"value": float(point[k]), "ci95": [float(low), float(high)]}
    return out


# ---------------------------------------------------------------- contenders
# Each takes the split and returns (test probabilities of the positive class, wall seconds, notes).

def run_logreg(s: dict) -> tuple[np.ndarray, float, dict]:
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    def as_object(x: pd.DataFrame) -> pd.DataFrame:  # categories -> strings with an explicit missing level
        out = x.copy()
        for c in s["cats"]:
            out[c] = out[c].astype(object).where(out[c].notna(), "__missing__")
        return out

    xtr, xte = as_object(s["xtr"]), as_object(s["xte"])
    model = make_pipeline(
        ColumnTransformer([
            ("cat", OneHotEncoder(handle_unknown="ignore"), s["cats"]),
            ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), s["nums"]),
        ]),
        LogisticRegression(max_iter=5000),
    )
    started = time.monotonic()
    model.fit(xtr, s["ytr"])
    p = model.predict_proba(xte)[:, 1]
    seconds = time.monotonic() - started
    return p, seconds, {"iterations": int(np.max(model[-1].n_iter_))}


def run_xgboost(s: dict) -> tuple[np.ndarray, float, dict]:
    import xgboost

    started = time.monotonic()
    model = xgboost.XGBClassifier(enable_categorical=True, tree_method="hist")
    model.fit(s["xtr"], s["ytr"])
    p = model.predict_proba(s["xte"])[:, 1]
    return p, time.monotonic() - started, {}


def run_lightgbm(s: dict) -> tuple[np.ndarray, float, dict]:
    import lightgbm

    started = time.monotonic()
    model = lightgbm.LGBMClassifier(verbose=-1)
    model.fit(s["xtr"], s["ytr"])
    p = model.predict_proba(s["xte"])[:, 1]
    return p, time.monotonic() - started, {}


def run_flaml(s: dict) -> tuple[np.ndarray, float, dict]:
    from flaml import AutoML

    automl = AutoML()
    started = time.monotonic()
    automl.fit(s["xtr"], s["ytr"], task="classification", metric="ap", time_budget=s["budget"], seed=0, verbose=0)
    p = automl.predict_proba(s["xte"])[:, 1]
    seconds = time.monotonic() - started
    config = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in (automl.best_config or {}).items()}
    return p, seconds, {"metric": "ap", "best_estimator": automl.best_estimator, "best_config": config,
                        "best_loss": float(automl.best_loss)}


def run_autogluon(s: dict) -> tuple[np.ndarray, float, dict]:
    from autogluon.tabular import TabularPredictor

    label = "__label__"
    train = s["xtr"].assign(**{label: s["ytr"]})
    started = time.monotonic()
    predictor = TabularPredictor(label=label, eval_metric="average_precision", path=str(s["tmp"] / "autogluon"),
                                 verbosity=0).fit(train, time_limit=s["budget"], presets="medium_quality")
    proba = predictor.predict_proba(s["xte"])
    p = proba[1].to_numpy()
    seconds = time.monotonic() - started
    board = predictor.leaderboard(silent=True)
    return p, seconds, {"best_model": predictor.model_best, "models": board["model"].tolist(),
                        "positive_class": str(predictor.positive_class)}


PREDICT = """
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np, pandas as pd
from rareml.model import load_model
m = load_model(sys.argv[2])
np.save(sys.argv[4], np.asarray(m.predict_proba(pd.read_parquet(sys.argv[3])), dtype=float))
"""


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def rareml_config(config: dict, dataset: str) -> str:
    """The shipped config, on the benchmark's split files (in the folder above the config's): no `time`
    (its column joins `drop`)."""
    table = {k: v for k, v in config.items() if k not in ("name", "data", "time", "test_data")}
    table["drop"] = list(config.get("drop", [])) + ([config["time"]] if "time" in config else [])
    head = {"name": f"{dataset.replace('_', '-')}-bench", "data": "../train.parquet", "test_data": "../test.parquet"}
    lines = [f"{k} = {toml_value(v)}" for k, v in {**head, **table}.items() if not isinstance(v, dict)]
    for k, v in table.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def run_rareml(s: dict, families: list[str] | None = None) -> tuple[np.ndarray, float, dict]:
    """`make all` at the budget: with the config's model families (the default ones), or only `families`."""
    tmp = s["tmp"] / ("-".join(families) if families else "default")
    tmp.mkdir()
    config = tmp / "rareml.toml"
    config.write_text(rareml_config(s["config"] | ({"model": {"families": families}} if families else {}), s["dataset"]))
    artifacts = tmp / "artifacts"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    env.pop("VIRTUAL_ENV", None)
    make = ["make", "--no-print-directory", "-C", str(ROOT)]
    log = tmp / "rareml-make.log"
    with open(log, "w") as out:  # setup is a no-op once .venv is installed; it is not part of the timing
        if subprocess.run([*make, "setup"], stdout=out, stderr=subprocess.STDOUT, env=env).returncode:
            raise RuntimeError(f"make setup failed:\n{log.read_text()[-3000:]}")
        started = time.monotonic()
        code = subprocess.run([*make, "all", f"CONFIG={config}", f"ARTIFACTS={artifacts}", f"BUDGET={s['budget']:g}"],
                              stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        seconds = time.monotonic() - started
    model_dir = artifacts / "model"
    stages_done = (artifacts / "serialized.json").is_file() and (model_dir / "manifest.json").is_file()
    if code and not stages_done:
        raise RuntimeError(f"make all failed (exit {code}):\n{log.read_text()[-3000:]}")
    npy = tmp / "rareml-test.npy"
    done = subprocess.run([str(RAREML_PY), "-c", PREDICT, str(ROOT), str(model_dir),
                           str(s["tmp"] / "test.parquet"), str(npy)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"rareml prediction failed:\n{done.stderr[-3000:]}")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    tuned = json.loads((artifacts / "tuned.json").read_text())
    selection = manifest.get("selection") or {}
    notes = {"trials": tuned.get("trials"), "calibration": manifest.get("calibration", {}).get("method"),
             "model": selection.get("chosen"), "weights": {k: round(v, 3) for k, v in selection.get("weights", {}).items()},
             "commit": machine()["rareml_commit"],
             "own_test_average_precision": manifest.get("metrics", {}).get("test", {}).get("average_precision")}
    if code:  # the three stages wrote the model, but `make all` failed after them (its closing summary)
        notes["make_all_exit"] = code
        tail = [line for line in log.read_text()[-2000:].strip().splitlines() if not line.startswith("make")]
        notes["make_all_error"] = tail[-1] if tail else "?"
    return np.load(npy), seconds, notes


RUNNERS = {"logreg": run_logreg, "xgboost": run_xgboost, "lightgbm": run_lightgbm, "flaml": run_flaml,
           "autogluon": run_autogluon, "rareml": run_rareml,
           "rareml-linear": lambda s: run_rareml(s, ["linear"]), "rareml-xgboost": lambda s: run_rareml(s, ["xgboost"])}


# ---------------------------------------------------------------- report

def machine() -> dict:
    ram = None
    try:
        kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
        ram = round(kib / 1024**2, 1)
    except (OSError, StopIteration):
        pass
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "rareml", "0*.py", "Makefile"],
                           capture_output=True, text=True)
    return {"cpus": os.cpu_count(), "ram_gib": ram, "python": platform.python_version(),
            "platform": platform.platform(), "packages": versions,
            "rareml_commit": commit.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")}


def fmt(m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{m['value']:.4f} [{lo:.4f}, {hi:.4f}]"


def table(result: dict) -> list[str]:
    lines = ["| contender | test AP [95% CI] | ROC-AUC [95% CI] | Brier [95% CI] | wall (s) |",
             "|---|---|---|---|---|"]
    for name, r in result["contenders"].items():
        if r["status"] == "ok":
            m = r["metrics"]
            lines.append(f"| {name} | {fmt(m['average_precision'])} | {fmt(m['roc_auc'])} | {fmt(m['brier'])} "
                         f"| {r['seconds']:.1f} |")
        else:
            lines.append(f"| {name} | failed: {r['error'].splitlines()[-1][:80]} | | | {r.get('seconds', '')} |")
    return lines


def write_report(result: dict, out: Path) -> list[str]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    s, m = result["split"], result["machine"]
    pk = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    lines = [f"# Peer benchmark: {result['dataset']}, budget {result['budget_s']:g} s", "",
             f"Machine: {m['cpus']} cores, {m['ram_gib']} GiB RAM, Python {m['python']}, {m['platform']}, "
             f"{result['date']}. rareml {m['rareml_commit']}.", "", f"Packages: {pk}.", "",
             f"Split: stratified 80/20 ({result['split']['method'].split(', ')[-1].rstrip(')')}) of `{result['data_file']}` "
             f"(sha256 {result['data_sha256'][:16]}...): train {s['train_rows']} rows ({s['train_positives']} "
             f"positive), test {s['test_rows']} rows ({s['test_positives']} positive). "
             f"No-skill test AP {result['no_skill_average_precision']:.4f}.", "",
             f"The budget is FLAML's `time_budget`, AutoGluon's `time_limit` (medium_quality) and rareml's "
             f"BUDGET for `make all` as a whole (prepare to registered model); logistic regression, XGBoost and LightGBM run with defaults. Wall time = fit + "
             f"predict (rareml: `make all`, its three stages). Intervals: {result['n_boot']} bootstrap "
             f"resamples of the test rows, the same for every contender.", ""]
    lines += table(result)
    notes = [f"- {name}: {', '.join(f'{k}={v}' for k, v in r['notes'].items() if k != 'log_tail')}"
             for name, r in result["contenders"].items() if r.get("notes")]
    if notes:
        lines += ["", "Notes:", *notes]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return lines


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--budget", type=float, default=120, help="seconds for FLAML, AutoGluon and rareml's tuning")
    parser.add_argument("--only", default=",".join(CONTENDERS), help=f"comma-separated subset of {','.join(CONTENDERS)}")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (split, models, logs)")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="random_state of the 80/20 split (0: the committed table; others: repeats that "
                             "show how much a small test set's figures move)")
    args = parser.parse_args()
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in only if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)} (known: {', '.join(CONTENDERS)})")

    config, path, raw, y, features = load_dataset(args.dataset)
    train_df, test_df, ytr, yte = train_test_split(raw, y, test_size=0.2, stratify=y,
                                                   random_state=args.split_seed)
    xtr, xte, cats, nums = typed_features(train_df, test_df, features, config.get("categorical", []))
    result = {
        "dataset": args.dataset, "budget_s": args.budget, "data_file": str(path.relative_to(ROOT)),
        "data_sha256": sha256_bytes(path.read_bytes()),
        "split": {"method": f"train_test_split(test_size=0.2, stratify=y, random_state={args.split_seed})",
                  "train_rows": len(train_df), "test_rows": len(test_df),
                  "train_positives": int(ytr.sum()), "test_positives": int(yte.sum()),
                  "train_sha256": frame_sha256(train_df), "test_sha256": frame_sha256(test_df)},
        "features": {"categorical": cats, "numeric": nums},
        "no_skill_average_precision": float(yte.mean()), "n_boot": args.n_boot,
        "machine": machine(), "date": datetime.now(UTC).isoformat(timespec="seconds"), "contenders": {},
    }
    print(f"{args.dataset}: train {len(train_df)} rows ({int(ytr.sum())} positive), test {len(test_df)} rows "
          f"({int(yte.sum())} positive); {len(cats)} categorical, {len(nums)} numeric features", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"peers-{args.dataset}-"))
    try:
        train_df.to_parquet(tmp / "train.parquet")
        test_df.to_parquet(tmp / "test.parquet")
        split = {"dataset": args.dataset, "config": config, "budget": args.budget, "tmp": tmp,
                 "xtr": xtr, "xte": xte, "ytr": ytr, "yte": yte, "cats": cats, "nums": nums}
        for name in only:
            print(f"{name:10s} ...", end=" ", flush=True)
            started = time.monotonic()
            try:
                p, seconds, notes = RUNNERS[name](split)
                entry = {"status": "ok", "seconds": round(seconds, 1), "notes": notes,
                         "metrics": evaluate(yte, p, args.n_boot, seed=0)}
                print(f"AP {entry['metrics']['average_precision']['value']:.4f} in {seconds:.1f} s "
                      f"(+{time.monotonic() - started - seconds:.1f} s untimed: setup, scoring, intervals)", flush=True)
            except Exception as exc:  # one contender's failure must not stop the others
                entry = {"status": "error", "seconds": round(time.monotonic() - started, 1),
                         "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
                print(f"FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            result["contenders"][name] = entry
    finally:
        if args.keep:
            print(f"working directory kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    out = ROOT / "benchmarks" / "results" / (f"peers-{args.dataset}-B{args.budget:g}" +
                                              (f"-split{args.split_seed}" if args.split_seed else ""))
    if out.with_suffix(".json").exists():  # a partial re-run (--only) keeps the other contenders' rows
        earlier = json.loads(out.with_suffix(".json").read_text())
        if earlier["split"] == result["split"] and earlier["n_boot"] == result["n_boot"]:
            result["contenders"] = {**earlier["contenders"], **result["contenders"]}
            # the earlier rows ran with packages this environment may lack (the peers' .venv-bench)
            result["machine"]["packages"] = {**earlier["machine"]["packages"], **result["machine"]["packages"]}
    lines = write_report(result, out)
    print("\n" + "\n".join(lines))
    print(f"\nwritten: {out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
