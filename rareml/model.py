"""The model: XGBoost training helpers, and the model folder (booster in XGBoost's own format,
calibrator and threshold as plain JSON, a manifest with checksums) written and loaded without pickle."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import xgboost as xgb

from rareml.artifacts import file_sha256
from rareml.calibration import Calibrator
from rareml.errors import RareMLError
from rareml.features import RecordEncoder, Schema, to_frame
from rareml.predictor import TreeEnsemble

BOOSTER_FILE, CALIBRATOR_FILE, MANIFEST_FILE = "model.ubj", "calibrator.json", "manifest.json"
EXAMPLES_FILE = "examples.json"  # a few held-out records of each class, for the GUI's "load a real example"
# 2: the manifest's own content is checksummed and makes model_version; 1 (still read, with a warning): only the files
FORMAT_VERSION = 2
# Left out of model_version: the version itself, the manifest's checksum, and when the model was made, so that
# training again on the same inputs gives the same version (the prediction log and the dashboards carry on).
UNVERSIONED = ("model_version", "manifest_sha256", "trained_at")

log = logging.getLogger(__name__)


def base_params(seed: int) -> dict:
    """What every booster shares; the tuned parameters are added to these."""
    return {"objective": "binary:logistic", "eval_metric": "aucpr", "tree_method": "hist",
            "nthread": os.cpu_count() or 1, "seed": seed, "verbosity": 0}


ENCODINGS = ("native", "ordinal")


def dmatrix(frame: pd.DataFrame, label: np.ndarray | None = None, encoding: str = "native",
            weight: np.ndarray | None = None) -> xgb.DMatrix:
    """Model input for XGBoost. Categoricals either as XGBoost's native categories (partition
    splits) or `ordinal`: their position among the schema's sorted levels, as a number. Which one
    wins depends on the data (on census, ordinal: high-cardinality partitions overfit), so the
    search chooses; the model folder records the choice."""
    if encoding == "ordinal":
        frame = frame.apply(lambda c: c.cat.codes.astype(float).where(c.notna()) if c.dtype == "category" else c)
    return xgb.DMatrix(frame, label=label, weight=weight, enable_categorical=encoding == "native",
                       nthread=os.cpu_count() or 1)


def train_booster(params: dict, dtrain: xgb.DMatrix, rounds: int, deval: xgb.DMatrix | None = None,
                  early_stopping: int = 50, callbacks: list | None = None) -> xgb.Booster:
    """Train; with `deval`, stop early on its average precision and keep the best iteration."""
    evals = [(deval, "eval")] if deval is not None else []
    return xgb.train(params, dtrain, num_boost_round=rounds, evals=evals, verbose_eval=False,
                     early_stopping_rounds=early_stopping if evals else None, callbacks=callbacks)


def average_boosters(boosters: list[xgb.Booster]) -> xgb.Booster:
    """One booster whose margin is the mean of the members' margins (log-odds): their trees side by
    side with leaf values divided by their number, and the base score the mean base margin. Members
    must share their input (features, types, categories); a single member comes back as it is."""
    if len(boosters) == 1:
        return boosters[0]
    models = [json.loads(b.save_raw("json")) for b in boosters]
    merged, k, trees = models[0], len(models), []
    for model in models:
        for tree in model["learner"]["gradient_booster"]["model"]["trees"]:
            tree["base_weights"] = [w / k for w in tree["base_weights"]]
            tree["split_conditions"] = [v / k if left == -1 else v  # a leaf's value sits in split_conditions
                                        for v, left in zip(tree["split_conditions"], tree["left_children"])]
            tree["id"] = len(trees)
            trees.append(tree)
    gbtree = merged["learner"]["gradient_booster"]["model"]
    gbtree.update(trees=trees, tree_info=[0] * len(trees), iteration_indptr=list(range(len(trees) + 1)))
    gbtree["gbtree_model_param"]["num_trees"] = str(len(trees))
    bases = [float(str(m["learner"]["learner_model_param"]["base_score"]).strip("[]")) for m in models]
    base = 1.0 / (1.0 + np.exp(-np.mean(logit(np.array(bases)))))
    merged["learner"]["learner_model_param"]["base_score"] = f"[{base:.9E}]"
    merged["learner"]["attributes"] = {}
    out = xgb.Booster()
    out.load_model(bytearray(json.dumps(merged).encode()))
    return out


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def mean_margin(scores: list[np.ndarray]) -> np.ndarray:
    """Probabilities of several models -> the probability of their mean log-odds: what the booster
    `average_boosters` makes of them predicts. One model's come back as they are."""
    if len(scores) == 1:
        return scores[0]
    return 1.0 / (1.0 + np.exp(-np.mean([logit(p) for p in scores], axis=0)))


def _n_trees(booster: xgb.Booster) -> int:
    """Trees to use: up to the best iteration when early stopping found one, else all (0)."""
    best = booster.attributes().get("best_iteration")
    return int(best) + 1 if best is not None else 0


def raw_scores(booster: xgb.Booster, data: xgb.DMatrix) -> np.ndarray:
    """Uncalibrated probabilities, up to the best iteration when early stopping found one."""
    return booster.predict(data, iteration_range=(0, _n_trees(booster)))


@dataclass
class Model:
    """A loaded, verified model: records in, calibrated probabilities and decisions out."""

    booster: xgb.Booster
    calibrator: Calibrator
    schema: Schema
    manifest: dict
    folder: Path | None = None

    def examples(self) -> dict[str, list[dict]]:
        """Held-out records by outcome ({"positive": [...], "negative": [...]}), empty if none were saved."""
        if self.folder is None or EXAMPLES_FILE not in self.manifest.get("files", {}):
            return {"positive": [], "negative": []}
        return json.loads((self.folder / EXAMPLES_FILE).read_text())

    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"]["threshold"])

    @property
    def version(self) -> str:
        return self.manifest["model_version"]

    @property
    def encoding(self) -> str:
        return self.manifest.get("encoding", "native")

    def predict_proba(self, data: pd.DataFrame | Iterable[Mapping]) -> np.ndarray:
        return self.calibrator.predict(raw_scores(self.booster, self.dmatrix(data)))

    def contributions(self, data: pd.DataFrame | Iterable[Mapping]) -> np.ndarray:
        """Per-feature contributions to the raw log-odds (SHAP values; last column = bias)."""
        return self.booster.predict(self.dmatrix(data), pred_contribs=True, iteration_range=(0, _n_trees(self.booster)))

    def dmatrix(self, data: pd.DataFrame | Iterable[Mapping]) -> xgb.DMatrix:
        return dmatrix(to_frame(data, self.schema), encoding=self.encoding)

    # The serving path: rows encoded by `encoder` (rareml.features.RecordEncoder.model_rows).
    SMALL = 32  # up to this many rows the compiled trees beat XGBoost's per-call overhead
    ONE_ROW_CHECKS = 5  # saved examples also checked one at a time (the one-row walk) at load

    @cached_property
    def encoder(self) -> RecordEncoder:
        return RecordEncoder(self.schema)

    @cached_property
    def ensemble(self) -> TreeEnsemble:
        return TreeEnsemble.from_booster(self.booster, _n_trees(self.booster) or None)

    def compile(self) -> None:
        """Build the compiled trees now rather than on the first small request (0.3 s for 1,000
        leaf-wise trees: a server's first requests would wait for it), and check them against
        XGBoost on the saved examples; a mismatch is a RareMLError, so a server refuses to start."""
        ensemble = self.ensemble
        examples = [record for records in self.examples().values() for record in records]
        if not examples:
            return
        rows = self.encoder.model_rows(self.encoder.encode_many(examples)[0])
        expected = self.booster.inplace_predict(rows, iteration_range=(0, _n_trees(self.booster)))
        # the many-row walk, and the one-row walk POST /predict takes, on a few rows
        compiled = np.r_[ensemble.predict(rows), [ensemble.predict(row[None])[0] for row in rows[:self.ONE_ROW_CHECKS]]]
        expected = np.r_[expected, expected[:self.ONE_ROW_CHECKS]]
        if not np.allclose(compiled, expected, rtol=1e-5, atol=1e-7):
            raise RareMLError(f"{self.folder}: the compiled trees disagree with XGBoost on the saved examples "
                              f"(largest difference {np.max(np.abs(compiled - expected)):.3g})")

    def predict_rows(self, rows: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for encoded rows (NaN for missing)."""
        if len(rows) <= self.SMALL:
            raw = self.ensemble.predict(rows)
        else:
            raw = self.booster.inplace_predict(rows, iteration_range=(0, _n_trees(self.booster)))
        return self.calibrator.predict(raw)

    def contributions_rows(self, rows: np.ndarray) -> np.ndarray:
        """SHAP values for encoded rows (last column = bias), as `contributions` gives for records."""
        data = xgb.DMatrix(rows, feature_names=self.booster.feature_names, feature_types=self.booster.feature_types,
                           enable_categorical=self.encoding == "native")
        return self.booster.predict(data, pred_contribs=True, iteration_range=(0, _n_trees(self.booster)))


def _canonical(manifest: Mapping, leave_out: Iterable[str]) -> bytes:
    """The manifest's content, whatever the layout of its file: sorted keys, no spaces. JSON writes a float as
    the shortest text that reads back as the same number, so a manifest read back hashes as the one written."""
    leave_out = set(leave_out)
    content = {key: value for key, value in manifest.items() if key not in leave_out}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def content_version(manifest: Mapping) -> str:
    """12 hex digits of the SHA-256 of everything in the manifest but `UNVERSIONED`: threshold, schema,
    reference, metrics, and the checksum of every file, examples included (they are what `compile` checks the
    serving trees on and what the GUI shows; the same inputs pick the same ones, so the version stays stable)."""
    return hashlib.sha256(_canonical(manifest, UNVERSIONED)).hexdigest()[:12]


def manifest_sha256(manifest: Mapping) -> str:
    """The SHA-256 of everything in the manifest but itself (trained_at and model_version included)."""
    return hashlib.sha256(_canonical(manifest, ("manifest_sha256",))).hexdigest()


def save_model(model_dir: Path, booster: xgb.Booster, calibrator: Calibrator, manifest: dict,
               examples: dict | None = None) -> dict:
    """Write the model folder; the manifest records each file's SHA-256, its own (`manifest_sha256`) and a
    content-derived `model_version` (`content_version`), so a changed threshold or schema is refused on loading."""
    reserved = set(manifest) & {"format_version", "files", *UNVERSIONED[:2]}
    if reserved:
        raise ValueError(f"save_model writes {', '.join(sorted(reserved))} itself")
    model_dir.mkdir(parents=True, exist_ok=True)
    booster.save_model(model_dir / BOOSTER_FILE)
    (model_dir / CALIBRATOR_FILE).write_text(json.dumps(calibrator.to_dict(), indent=2) + "\n")
    names = [BOOSTER_FILE, CALIBRATOR_FILE]
    if examples is not None:
        (model_dir / EXAMPLES_FILE).write_text(json.dumps(examples, indent=1) + "\n")
        names.append(EXAMPLES_FILE)
    # through JSON text and back before hashing: what is hashed is what a reader parses (tuples come back as
    # lists, numeric keys as strings)
    content = json.loads(json.dumps({"format_version": FORMAT_VERSION, **manifest,
                                     "files": {name: file_sha256(model_dir / name) for name in names}}))
    manifest = {"format_version": FORMAT_VERSION, "model_version": content_version(content), **content}
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    (model_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_model_dir(model_dir: str | Path) -> dict:
    """Read the manifest and check it and every file against their checksums, without loading the booster
    (so a process that will fork, like gunicorn's master, can check a model and stay XGBoost-free:
    XGBoost's thread pool does not survive a fork). Any problem is a RareMLError."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise RareMLError(f"no model at {model_dir}: run `make serialize` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RareMLError(f"{path} is corrupt: {exc}") from None
    if not isinstance(manifest, dict):
        raise RareMLError(f"{path} is corrupt: not a JSON object")
    if manifest.get("format_version") == FORMAT_VERSION:
        intact = manifest.get("manifest_sha256") == manifest_sha256(manifest) and \
            manifest.get("model_version") == content_version(manifest)
    elif manifest.get("format_version") == 1:
        intact = _format_1_intact(manifest, path)
    else:
        raise RareMLError(f"{model_dir}: unsupported model format {manifest.get('format_version')!r} "
                          f"(this rareml reads formats 1 to {FORMAT_VERSION})")
    if not intact:
        raise RareMLError(f"{path} was changed after it was written: its content does not match model_version "
                          f"{manifest.get('model_version')} (re-run `make serialize`)")
    files = manifest.get("files")
    if not isinstance(files, dict) or not {BOOSTER_FILE, CALIBRATOR_FILE} <= set(files) <= {
            BOOSTER_FILE, CALIBRATOR_FILE, EXAMPLES_FILE}:
        raise RareMLError(f"{path} does not list the model files")
    for name, expected in files.items():
        if not (model_dir / name).is_file() or file_sha256(model_dir / name) != expected:
            raise RareMLError(f"{model_dir / name} is missing or does not match its checksum in the manifest")
    return manifest


def _format_1_intact(manifest: dict, path: Path) -> bool:
    """A format-1 manifest (before 2) checksums the files, not itself: its version is that of the booster and
    calibrator. Still read, with a warning, so folders written before keep loading until serialized again."""
    log.warning("%s is in model format 1: its threshold, schema and reference statistics are not covered by a "
                "checksum; re-run `make serialize` to write format %d", path, FORMAT_VERSION)
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    legacy = hashlib.sha256(f"{files.get(BOOSTER_FILE)}{files.get(CALIBRATOR_FILE)}".encode()).hexdigest()[:12]
    return "manifest_sha256" not in manifest and manifest.get("model_version") == legacy


def load_model(model_dir: str | Path) -> Model:
    """Load the model folder, verifying every checksum first; any problem is a RareMLError."""
    manifest = verify_model_dir(model_dir)
    model_dir = Path(model_dir)
    booster = xgb.Booster()
    booster.load_model(model_dir / BOOSTER_FILE)
    calibrator = Calibrator.from_dict(json.loads((model_dir / CALIBRATOR_FILE).read_text()))
    return Model(booster, calibrator, Schema.from_dict(manifest["schema"]), manifest, model_dir)
