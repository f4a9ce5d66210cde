"""The project report and the slide deck, written from the run itself (07_report.py, make report).

`gather` reads what the stages left (prepared.json, tuned.json, the model's manifest, the report
figures, the tuning history, the retraining gates, the monitoring screenshots, the test suite and
the CI workflows) into one dict of facts; `render` fills the Jinja templates in
rareml/report_templates/ from it (report.html, slides.html: self-contained, every image embedded);
`write_pdf` prints either with WeasyPrint, whose CSS paged media gives the report a title page, a
table of contents with page numbers, numbered sections and figure captions, running footers and
PDF bookmarks (Chromium's print has no target-counter, so no page numbers in a table of contents).
Nothing here is written per model: every number and sentence comes from the facts.
"""
from __future__ import annotations

import base64
import html
import math
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from rareml import registry
from rareml.artifacts import Layout, read_json
from rareml.config import SMALL_ROWS, Config
from rareml.errors import RareMLError
from rareml.model import MANIFEST_FILE

PROJECT = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "report_templates"
SECTIONS = ("The problem", "The validation scheme and why", "How it is tested", "Decisions", "Performance",
            "Monitoring", "Links")
METRIC_NAMES = {"average_precision": "average precision", "roc_auc": "ROC-AUC", "brier": "Brier score",
                "log_loss": "log-loss", "precision": "precision", "recall": "recall", "f1": "F1",
                "positive_rate": "positive rate", "mcc": "MCC", "fbeta": "F-beta", "cost": "cost per case"}
FIGURES = {  # file under the run's reports/ (or tuning/), caption
    "pr_roc": ("reports/pr_roc.png", "Precision-recall and ROC curves on the test split, against no skill."),
    "reliability": ("reports/reliability.png", "Reliability diagram on the test split: calibrated and raw scores."),
    "threshold": ("reports/threshold.png", "Choosing the production threshold on calibrated out-of-fold scores."),
    "confusion": ("reports/confusion_matrix.png", "Confusion matrix on the test split at the production threshold."),
    "shap_importance": ("reports/shap_importance.png", "Global importance: mean absolute SHAP value per feature."),
    "shap_beeswarm": ("reports/shap_beeswarm.png", "SHAP values of a test sample: direction and spread per feature."),
    "optuna_history": ("tuning/{family}/optuna_history.png", "Optuna's optimisation history (CV average precision per trial)."),
    "optuna_importance": ("tuning/{family}/optuna_param_importances.png", "Optuna's parameter importance (fANOVA)."),
}
THRESHOLD_WHY = {
    "f1": "maximises F1: no error costs are known, precision and recall matter equally",
    "fbeta": "maximises F-beta with beta = {beta:g}: recall matters {beta:g} times as much as precision",
    "mcc": "maximises Matthews' correlation coefficient, one balanced figure",
    "min_precision": "maximises recall while precision stays at least {min_precision:g}: alerts must be mostly right",
    "min_recall": "maximises precision while recall stays at least {min_recall:g}: most positives must be caught",
    "cost": "minimises the expected cost per case, a false positive costing {cost_fp:g} and a false negative "
            "{cost_fn:g}",
}


def locate(root: Path, which: str = registry.CHAMPION) -> tuple[Path, str]:
    """The run folder (root itself, or root/runs/<time>/ for a retraining) whose model is `which`
    (an alias, or "newest": root's own model/), and a sentence saying which model that is."""
    root = Path(root)
    version = None if which == "newest" else registry.version_of(root, which)
    if version is None:
        if not (root / "model" / MANIFEST_FILE).is_file():
            raise RareMLError(f"{root / 'model'} not found: run `make all` first (with the same ARTIFACTS)")
        why = "the newest model of this folder" if which == "newest" else f"the newest model (no {which} here)"
        return root, why
    for run in [root, *sorted((root / "runs").glob("*/"), reverse=True)]:
        manifest = run / "model" / MANIFEST_FILE
        if manifest.is_file() and read_json(manifest).get("model_version") == version:
            return run, f"the {which} of {root.name}/ (version {version})"
    raise RareMLError(f"the {which} {version} has no run folder left under {root} (its prepare, tune and "
                      "serialize outputs): pass --model newest to describe the newest model instead")


def data_uri(png: Path | bytes) -> str:
    """A PNG (a file, or its bytes) as a data: URI, so the page needs no other file."""
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def inline_markdown(text: str) -> str:
    """The little Markdown a data card uses (code, bold, links) as HTML, everything else escaped."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"\[([^\]]+)\]\((https?://[^)\s]+)\)", r'<a href="\2">\1</a>', out)


def data_card(data: Path) -> dict | None:
    """The `## <file name>` section of the README.md beside the data file (data/README.md for the
    shipped datasets; write one beside your own file the same way): its bullet points, with the
    source and licence picked out."""
    readme = Path(data).parent / "README.md"
    if not readme.is_file():
        return None
    name = Path(data).name
    match = re.search(rf"^## {re.escape(name)}.*?$(.*?)(?=^## |\Z)", readme.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    if not match:
        return None
    bullets, current = [], None
    for line in match.group(1).splitlines():
        if line.startswith("- "):
            current = line[2:].strip()
            bullets.append(current)
        elif current is not None and line.startswith("  ") and line.strip():
            bullets[-1] += " " + line.strip()
        elif not line.strip() or line.startswith("|"):
            current = None
    card = {"file": readme.relative_to(readme.parent.parent).as_posix(), "bullets": [], "source": None, "licence": None}
    for bullet in bullets:
        label = re.match(r"\*\*([^*:]+):?\*\*:?\s*(.*)", bullet)
        key = label.group(1).strip().lower() if label else ""
        if key in ("source", "licence", "license"):
            card["source" if key == "source" else "licence"] = inline_markdown(label.group(2))
        else:
            card["bullets"].append(inline_markdown(bullet))
    return card


def number(value: object, digits: int = 4) -> str:
    """A figure as the report prints it (n/a for a missing or NaN value)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"


def problem(config: Config, prepared: dict, manifest: dict) -> dict:
    schema = manifest["schema"]
    rows, positives = prepared["rows"], prepared["positives"]
    splits = [{"split": part, "rows": rows[part], "positives": positives[part],
               "rate": positives[part] / rows[part] if rows[part] else float("nan")} for part in ("train", "test")]
    features = {"numeric": [], "categorical": []}
    for f in schema["features"]:
        features[f["kind"]].append({"name": f["name"], "missing": f.get("missing_rate", 0.0),
                                    "levels": len(f.get("categories", [])),
                                    "range": [f.get("min"), f.get("max")] if f["kind"] == "numeric" else None})
    ignored = [c for c in schema.get("ignored", []) if c not in prepared["dropped"]]
    return {"data_file": Path(prepared["config"]["data"]).name, "data_sha256": prepared["fingerprint"]["data_file_sha256"],
            "test_file": Path(prepared["config"]["test_data"]).name if prepared["config"].get("test_data") else None,
            "card": data_card(Path(prepared["config"]["data"])), "target": schema["target"],
            "positive": schema["positive"], "splits": splits, "total_rows": rows["train"] + rows["test"],
            "features": features, "dropped": prepared["dropped"], "ignored": ignored,
            "sensitive": schema["sensitive"], "time": config.time, "weight": prepared["config"].get("weight")}


def validation(config: Config, prepared: dict, tuned: dict, manifest: dict) -> dict:
    """The scheme this run used, and why, in sentences that follow from its numbers."""
    search = tuned.get("search", {})
    train_rows, test_rows = prepared["rows"]["train"], prepared["rows"]["test"]
    folds, repeats = search.get("cv_folds", config.folds_for(train_rows)), search.get("cv_repeats", config.repeats_for(train_rows))
    rate = prepared["positives"]["train"] / train_rows
    split = prepared["split"]
    why = []
    if split.startswith("separate test file"):
        why.append(f"The test set is the separate file {html.escape(split.split(': ', 1)[1])} "
                   f"({test_rows:,} rows), given by the config: it was never seen while anything was learned.")
    elif split.startswith("time"):
        why.append(f"The test set is the latest period ({html.escape(split.split('= ', 1)[1])}, {test_rows:,} rows) and "
                   f"training is everything before ({train_rows:,} rows): the model is used on what comes after "
                   "the data it learned from, and a time split shows the shift between periods that a random "
                   "split would hide.")
    else:
        why.append(f"Without a time column, the test set is a stratified random {config.test_size:.0%} "
                   f"({test_rows:,} rows): the positive rate stays the same in both parts, which a plain random "
                   f"split does not guarantee with {prepared['positives']['test']:,} test positives.")
    why.append("Everything learned (category levels, numeric ranges, drift references, hyper-parameters, the number "
               "of trees, the calibrator and the threshold) comes from the training split; the test split is read "
               "once, by the last stage, after all of those are fixed.")
    why.append(f"Tuning uses stratified {folds}-fold cross-validation on the training split"
               + (f", repeated {repeats} times with other shuffles: with {train_rows:,} training rows (at most "
                  f"{SMALL_ROWS:,}) one K-fold estimate is noisy enough for a long search to chase luck, and each "
                  "row's out-of-fold score is the mean over the repeats." if repeats > 1 else
                  f", not repeated: with {train_rows:,} training rows one K-fold estimate is stable and the time "
                  "goes to more trials instead.")
               + (" Three folds rather than five: above 50,000 rows each fold already holds thousands of "
                  "positives." if folds == 3 and not config.cv_folds else ""))
    why.append(f"Each fold gives up a stratified {search.get('early_stopping_share', 0.1):.0%} slice of its training "
               f"part for early stopping (patience {search.get('early_stopping_rounds', 100)} rounds): the fold's "
               "validation part never decides when to stop, so the out-of-fold scores that calibration and the "
               "threshold are fitted on are honest.")
    why.append(f"The search maximises average precision: with {rate:.1%} positives, ROC-AUC is dominated by easy "
               f"negatives, while average precision measures how clean the top of the ranking is; its no-skill value "
               f"is the positive rate ({manifest['metrics']['no_skill']['average_precision']:.4f} on the test "
               "split), not 0.5.")
    policy = manifest["threshold"].get("policy", {"metric": manifest["threshold"]["metric"]})
    why.append(f"The production threshold ({policy['metric']}) {THRESHOLD_WHY[policy['metric']].format(**policy)}; it "
               "is chosen on calibrated out-of-fold scores, so its precision and recall are known before the test "
               "set is read.")
    if prepared["config"].get("weight"):
        why.append(f"Rows are weighted by <code>{html.escape(prepared['config']['weight'])}</code> when fitting and "
                   "early stopping; validation scores are unweighted.")
    return {"split": split, "train_rows": train_rows, "test_rows": test_rows, "folds": folds, "repeats": repeats,
            "early_stopping_share": search.get("early_stopping_share"), "metric": "average precision",
            "threshold_metric": policy["metric"], "why": why}


def test_suite(project: Path = PROJECT, timeout: float = 300) -> dict:
    """The test tiers (tests/<tier>/__init__.py's docstring says what each proves) with the number
    of tests pytest collects in each, and the CI stages (the GitHub workflows and .ci/run)."""
    tiers = []
    for init in sorted((project / "tests").glob("*/__init__.py")):
        text = init.read_text(encoding="utf-8").strip().strip('"').strip()
        tiers.append({"tier": init.parent.name, "proves": " ".join(text.split()), "tests": 0})
    collected, error = 0, None
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                              cwd=project, capture_output=True, text=True, timeout=timeout, check=False)
        ids = [line for line in proc.stdout.splitlines() if line.startswith("tests/") and "::" in line]
        for tier in tiers:
            tier["tests"] = sum(i.startswith(f"tests/{tier['tier']}/") for i in ids)
        collected = len(ids)
        if proc.returncode not in (0, 5) or not ids:
            last = (proc.stdout + proc.stderr).strip().splitlines() or ["no output"]
            error = f"pytest --collect-only failed: {last[-1]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        error = f"pytest --collect-only did not run: {exc}"
    return {"tiers": tiers, "collected": collected, "error": error, "ci": ci_stages(project)}


def ci_stages(project: Path = PROJECT) -> list[dict]:
    """Each GitHub workflow's jobs and step names, and the stages of .ci/run (its `== ` lines)."""
    import yaml

    stages = []
    for path in sorted((project / ".github" / "workflows").glob("*.yml")):
        flow = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for job, spec in (flow.get("jobs") or {}).items():
            steps = [s.get("name") or s.get("uses") or (s.get("run") or "").splitlines()[0]
                     for s in spec.get("steps", []) if isinstance(s, dict)]
            stages.append({"where": f".github/workflows/{path.name}", "job": f"{flow.get('name', path.stem)}: {job}",
                           "steps": [s for s in steps if s and not s.startswith("actions/")]})
    run = project / ".ci" / "run"
    if run.is_file():
        steps = re.findall(r'^echo "== (.+)"$', run.read_text(encoding="utf-8"), re.MULTILINE)
        stages.append({"where": ".ci/run", "job": "CI on a clean clone (this machine)", "steps": steps})
    return stages


def main_family(tuned: dict, manifest: dict) -> str:
    """The family the decisions section details: the heaviest in the model, else the best searched."""
    weights = manifest.get("selection", {}).get("weights") or {}
    return max(weights, key=weights.get) if weights else tuned["best_family"]


def decisions(tuned: dict, manifest: dict) -> dict:
    search, name = tuned.get("search", {}), main_family(tuned, manifest)
    entry = tuned["families"][name]
    space, trials = entry.get("search", {}), tuned.get("trials", {})
    calibration = manifest["calibration"]
    threshold = manifest["threshold"]
    choice = dict(entry["choice"])
    encoding = choice.pop("encoding", None)
    return {"family": name, "selection": manifest.get("selection"),
            "space": {k: v for k, v in space.items() if k not in ("starts", "max_trials")},
            "ranges": space.get("ranges", {}), "starts": space.get("starts", []),
            "grow_policies": space.get("grow_policies", []), "encodings": space.get("encodings", []),
            "scale_pos_weight": space.get("scale_pos_weight"), "sampler": search.get("sampler"),
            "pruner": search.get("pruner"), "max_rounds": space.get("max_rounds"),
            "budget_s": tuned.get("budget", {}).get("seconds"), "trials": trials,
            "complete": trials.get("COMPLETE", 0), "pruned": trials.get("PRUNED", 0),
            "best_trial": entry.get("best_trial"), "best_cv": entry.get("cv", {}),
            "params": choice | {"n_estimators": entry.get("iterations")}, "encoding": encoding,
            "ensemble": [{"trial": m["trial"], "n_estimators": m["iterations"]} for m in entry.get("ensemble", [])],
            "oof_average_precision": entry.get("oof_average_precision"),
            "param_importance": entry.get("param_importance", {}),
            "calibration": {"method": calibration["method"], "candidates": calibration["cv"],
                            "test_ece": calibration["test_ece"]},
            "threshold": threshold, "validation": manifest["metrics"]["validation"]}


def performance(manifest: dict, stem: str, project: Path = PROJECT) -> dict:
    m = manifest["metrics"]
    rows = [{"metric": k, "name": METRIC_NAMES.get(k, k), "value": v, "low": m["test_ci"][k][0],
             "high": m["test_ci"][k][1], "no_skill": m["no_skill"].get(k)} for k, v in m["test"].items()]
    fairness = []
    for attribute, groups in m.get("fairness", {}).items():
        rates = [g["selection_rate"] for g in groups.values()]
        tprs = [g["true_positive_rate"] for g in groups.values() if not math.isnan(g["true_positive_rate"])]
        fairness.append({"attribute": attribute, "groups": groups,
                         "selection_gap": max(rates) - min(rates) if rates else float("nan"),
                         "tpr_gap": max(tprs) - min(tprs) if tprs else float("nan")})
    peers = []
    for path in sorted((project / "benchmarks" / "results").glob(f"peers-{stem}-B*.json")):
        if "split" in path.stem:
            continue
        bench = read_json(path)
        peers.append({"file": f"benchmarks/results/{path.name}", "budget_s": bench["budget_s"], "date": bench["date"],
                      "split": bench["split"], "no_skill": bench["no_skill_average_precision"],
                      "contenders": [{"name": name, **{k: c["metrics"][k] for k in ("average_precision", "roc_auc", "brier")},
                                      "seconds": c["seconds"]} for name, c in bench["contenders"].items()
                                     if c.get("status") == "ok"]})
    serve = project / "benchmarks" / "results" / "serve.json"
    serving = None
    if serve.is_file():
        s = read_json(serve)
        serving = {"file": "benchmarks/results/serve.json", "model_version": s["model_version"], "trees": s.get("trees"),
                   "workers": s.get("workers"), "connections": s.get("connections"), "machine": s.get("machine"),
                   "same_model": s["model_version"] == manifest["model_version"],
                   "rows": [{"endpoint": name, **{k: s[key].get(k) for k in ("requests_per_s", "p50_ms", "p99_ms")},
                             "rows_per_s": s[key].get("rows_per_s")}
                            for name, key in (("/health", "health"), ("/predict", "predict"),
                                              ("/predict/batch (records)", "batch"),
                                              ("/predict/batch (columns)", "batch_columns")) if key in s]}
    return {"rows": rows, "fairness": fairness, "peers": peers, "serving": serving,
            "families": [{"family": "xgboost", "note": "the only family so far"}],
            "threshold": manifest["threshold"]["threshold"]}


def retrainings(root: Path) -> list[dict]:
    """Every gated retraining under root/runs/ (oldest first): when, why, the gate's evidence and outcome."""
    out = []
    for gate_file in sorted(Path(root).glob("runs/*/gate.json")):
        gate, folder = read_json(gate_file), gate_file.parent
        run = read_json(folder / "run.json") if (folder / "run.json").is_file() else {}
        outcome = read_json(folder / "outcome.json") if (folder / "outcome.json").is_file() else {}
        alert = run.get("alert") or {}
        alert = (alert[0] if alert else {}) if isinstance(alert, list) else alert
        try:
            started = datetime.strptime(folder.name, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            continue
        ap = gate["average_precision"]
        out.append({"run": folder.name, "started": started, "alert": alert.get("alertname") or (alert.get("labels") or {}).get("alertname")
                    or ("by hand" if not alert else "alert"), "champion": ap["champion"], "challenger": ap["challenger"],
                    "difference": ap["difference"], "rows": gate["rows"], "positives": gate["positives"],
                    "promote": gate["promote"], "reasons": gate["reasons"],
                    "champion_version": gate.get("champion"), "challenger_version": gate.get("challenger"),
                    "outcome": outcome.get("outcome") or ("promoted" if gate["promote"] else "rejected")})
    return out


def monitoring(out: Path, model_version: str) -> dict:
    """What monitoring/screenshots.py left in out/monitoring/ (monitoring.json), if it was taken
    for this model; else a reason."""
    folder = Path(out) / "monitoring"
    index = folder / "monitoring.json"
    if not index.is_file():
        return {"taken": False, "why": "no monitoring screenshots were taken (07_report.py --monitoring run needs "
                                       "Prometheus, Alertmanager and Chromium: apt-get install prometheus "
                                       "prometheus-alertmanager chromium)"}
    taken = read_json(index)
    if taken.get("model_version") != model_version:
        return {"taken": False, "why": f"the screenshots in {folder} are of model {taken.get('model_version')}, "
                                       f"not {model_version}: rerun with --monitoring run"}
    return taken | {"taken": True, "folder": folder}


def links(repo_url: str | None, space_repo: str | None) -> dict:
    return {"repository": repo_url, "space": f"https://huggingface.co/spaces/{space_repo}" if space_repo else None,
            "space_repo": space_repo}


def git_remote(project: Path = PROJECT) -> str | None:
    """The repository's web address from `git remote get-url origin` (ssh or https form), if any."""
    try:
        url = subprocess.run(["git", "remote", "get-url", "origin"], cwd=project, capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not url:
        return None
    url = re.sub(r"^git@([^:]+):", r"https://\1/", url)
    url = re.sub(r"^ssh://git@([^/]+)/", r"https://\1/", url)
    url = url.removesuffix(".git")
    return url if url.startswith(("https://", "http://")) else None


def git_commit(project: Path = PROJECT) -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def gather(root: Path, config: Config, out: Path, which: str = registry.CHAMPION, repo_url: str | None = None,
           space_repo: str | None = None, author: str | None = None, tests: bool = True) -> dict:
    """Every fact the report and the slides show, from the run that trained the model `which`."""
    run, described = locate(root, which)
    layout = Layout(run)
    prepared, tuned = read_json(layout.prepared), read_json(layout.tuned)
    manifest = read_json(layout.model_dir / MANIFEST_FILE)
    if "families" not in tuned:
        raise RareMLError(f"{layout.tuned} was written before model families (rareml 0.x): run make tune and make "
                          "serialize again to report on it")
    figures, missing = {}, {}
    for key, (name, caption) in FIGURES.items():
        name = name.format(family=main_family(tuned, manifest))
        path = run / name
        if path.is_file():
            figures[key] = {"key": key, "source": name, "caption": caption, "src": data_uri(path)}
        else:
            missing[key] = f"{name} was not written by this run"
    timeline = retrainings(root)
    if timeline:
        import io

        from rareml import plots

        buffer = io.BytesIO()
        plots.retraining_timeline(timeline).savefig(buffer, format="png", dpi=110)
        figures["timeline"] = {"key": "timeline", "source": "runs/*/gate.json", "caption": "Retraining timeline: "
                               "champion and challenger on each gate set.", "src": data_uri(buffer.getvalue())}
    watched = monitoring(out, manifest["model_version"])
    if watched["taken"]:
        for name in watched["screenshots"]:
            figures[f"shot:{name}"] = {"key": name, "source": f"monitoring/{name}", "src": data_uri(watched["folder"] / name),
                                       "caption": f"Prometheus under simulated drift: {name[11:-4].replace('-', ' ')}."}
        for panel in watched["panels"]:
            figures[f"panel:{panel['file']}"] = {
                "key": panel["file"], "source": f"monitoring/{panel['file']}", "src": data_uri(watched["folder"] / panel["file"]),
                "caption": f"Dashboard panel \u201c{panel['title']}\u201d ({panel['section']}), drawn from its queries."}
    serialized = read_json(run / "serialized.json") if (run / "serialized.json").is_file() else {}
    return {
        "title": f"{config.name}: predicting {manifest['schema']['target']} = {manifest['schema']['positive']}",
        "name": config.name, "model_version": manifest["model_version"], "described": described,
        "trained_at": manifest.get("trained_at"), "generated_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "author": author, "commit": git_commit(), "config_file": config.path.name,
        "problem": problem(config, prepared, manifest), "validation": validation(config, prepared, tuned, manifest),
        "tests": test_suite() if tests else {"tiers": [], "collected": 0, "error": "not collected (--no-tests)",
                                            "ci": ci_stages()},
        "decisions": decisions(tuned, manifest), "performance": performance(manifest, config.path.stem),
        "monitoring": watched, "retrainings": timeline, "figures": figures, "missing": missing,
        "links": links(repo_url, space_repo), "mlflow": serialized.get("mlflow"),
        "versions": manifest.get("versions", {}), "sections": SECTIONS,
    }


SLIDE_MINUTES = (0.5, 1.0, 1.0, 1.0, 1.0, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5)  # 13 slides, 12 minutes


def render(facts: dict, template: str) -> str:
    """report.html or slides.html from the facts (autoescaped Jinja; the templates' own CSS inline)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = number
    env.filters["pct"] = lambda v, d=1: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{d}f}%"
    env.filters["ci"] = lambda e, d=4: f"{number(e['value'], d)} [{number(e['low'], d)}, {number(e['high'], d)}]"
    css = (TEMPLATES / f"{Path(template).stem}.css").read_text(encoding="utf-8")
    return env.get_template(f"{template}.j2").render(f=facts, css=css, minutes=SLIDE_MINUTES)


def write_pdf(page: str, path: Path) -> None:
    """Print an HTML page to PDF with WeasyPrint (CSS paged media); a RareMLError naming what to
    install when WeasyPrint or the Pango library it needs is missing."""
    import logging

    for noisy in ("weasyprint", "fontTools"):  # per-step INFO lines and font-subsetting chatter
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import weasyprint
    except OSError as exc:  # the Python package is there, its system library is not
        raise RareMLError(f"WeasyPrint cannot load Pango ({exc}): apt-get install libpango-1.0-0 "
                          "libpangoft2-1.0-0, or pass --no-pdf") from None
    except ImportError:
        raise RareMLError("WeasyPrint is not installed: make setup (requirements.txt), or pass --no-pdf") from None
    weasyprint.HTML(string=page, base_url=str(TEMPLATES)).write_pdf(path)
