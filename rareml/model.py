"""The model folder (one member per model family, each in its own format and never a pickle, the
calibrator and threshold as plain JSON, a manifest with checksums) written and loaded, and `Model`:
records in, calibrated probabilities, decisions and explanations out, whatever the families."""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from rareml.artifacts import file_sha256
from rareml.calibration import Calibrator
from rareml.errors import RareMLError
from rareml.families import Scorer, blend, family
from rareml.features import RecordEncoder, Schema, frame_rows, to_frame

CALIBRATOR_FILE, MANIFEST_FILE = "calibrator.json", "manifest.json"
EXAMPLES_FILE = "examples.json"  # a few held-out records of each class, for the GUI's "load a real example"
LEGACY_BOOSTER = "model.ubj"  # formats 1 and 2: the one XGBoost booster
# 3: `members`, one per model family with its weight in the blend, each family's own files;
# 2 (still read): one XGBoost booster, the manifest's own content checksummed and making model_version;
# 1 (still read, with a warning): only the files checksummed
FORMAT_VERSION = 3
# Left out of model_version: the version itself, the manifest's checksum, and when the model was made, so that
# training again on the same inputs gives the same version (the prediction log and the dashboards carry on).
UNVERSIONED = ("model_version", "manifest_sha256", "trained_at")

log = logging.getLogger(__name__)


def members_of(manifest: Mapping) -> list[dict]:
    """The manifest's member entries ({"family", "weight", "files", ...}); the one booster of a
    format 1 or 2 folder as an XGBoost member."""
    if manifest.get("format_version", 0) >= 3:
        return list(manifest["members"])
    from rareml.families.xgboost import choice_of

    params = manifest.get("params") if isinstance(manifest.get("params"), dict) else {}
    return [{"family": "xgboost", "weight": 1.0, "files": [LEGACY_BOOSTER], "encoding": manifest.get("encoding", "native"),
             "choice": choice_of(params, manifest.get("encoding"))}]


@dataclass
class Member:
    """One family's fit in a model, and its weight in the blend."""

    family: str
    weight: float
    scorer: Scorer
    entry: dict  # its manifest entry


@dataclass
class Model:
    """A loaded, verified model: records in, calibrated probabilities and decisions out. Several
    members blend by their weighted mean log-odds, so their explanations add up the same way."""

    members: list[Member]
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
    def kind(self) -> str:
        """The family, or "blend of a, b" (what GET /model and the GUI say)."""
        names = [m.family for m in self.members]
        return names[0] if len(names) == 1 else f"blend of {', '.join(names)}"

    @cached_property
    def encoder(self) -> RecordEncoder:
        return RecordEncoder(self.schema)

    def rows(self, data: pd.DataFrame | Iterable[Mapping]) -> np.ndarray:
        """Records or a frame as encoded rows (a level never seen in training is missing)."""
        return frame_rows(to_frame(data, self.schema))

    def raw_rows(self, rows: np.ndarray) -> np.ndarray:
        """Uncalibrated probabilities for encoded rows (`RecordEncoder.model_rows`)."""
        return blend([m.scorer.raw(rows) for m in self.members], [m.weight for m in self.members])

    def predict_rows(self, rows: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for encoded rows (NaN for missing)."""
        return self.calibrator.predict(self.raw_rows(rows))

    def predict_proba(self, data: pd.DataFrame | Iterable[Mapping]) -> np.ndarray:
        return self.predict_rows(self.rows(data))

    def contributions_rows(self, rows: np.ndarray) -> np.ndarray:
        """Per-feature contributions to the raw log-odds (last column = bias): SHAP values for trees,
        coefficient times value for a linear member; a blend's are its members', weighted."""
        if len(self.members) == 1:
            return self.members[0].scorer.contributions(rows)
        total = sum(m.weight for m in self.members)
        return sum(m.weight / total * m.scorer.contributions(rows) for m in self.members)

    def contributions(self, data: pd.DataFrame | Iterable[Mapping]) -> np.ndarray:
        return self.contributions_rows(self.rows(data))

    def check(self) -> None:
        """Ready every member's serving path now (the compiled trees: a server's first requests would
        wait for them) and hold it to the reference one on the saved examples; a mismatch is a
        RareMLError, so a server refuses to start."""
        examples = [record for records in self.examples().values() for record in records]
        rows = self.encoder.model_rows(self.encoder.encode_many(examples)[0]) if examples else \
            np.empty((0, len(self.schema.names)))
        for member in self.members:
            try:
                member.scorer.check(rows)
            except RareMLError as exc:
                raise RareMLError(f"{self.folder}: {member.family}: {exc} on the saved examples") from None

    def threads(self, n: int) -> None:
        """Threads a batch prediction may use, per member."""
        for member in self.members:
            member.scorer.threads(n)


def _canonical(manifest: Mapping, leave_out: Iterable[str]) -> bytes:
    """The manifest's content, whatever the layout of its file: sorted keys, no spaces. JSON writes a float as
    the shortest text that reads back as the same number, so a manifest read back hashes as the one written."""
    leave_out = set(leave_out)
    content = {key: value for key, value in manifest.items() if key not in leave_out}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def content_version(manifest: Mapping) -> str:
    """12 hex digits of the SHA-256 of everything in the manifest but `UNVERSIONED`: threshold, schema,
    reference, metrics, and the checksum of every file, examples included (they are what `Model.check` holds the
    serving path to and what the GUI shows; the same inputs pick the same ones, so the version stays stable)."""
    return hashlib.sha256(_canonical(manifest, UNVERSIONED)).hexdigest()[:12]


def manifest_sha256(manifest: Mapping) -> str:
    """The SHA-256 of everything in the manifest but itself (trained_at and model_version included)."""
    return hashlib.sha256(_canonical(manifest, ("manifest_sha256",))).hexdigest()


def save_model(model_dir: Path, members: list[dict], calibrator: Calibrator, manifest: dict,
               examples: dict | None = None) -> dict:
    """Write the model folder. `members`: [{"family", "weight", "fitted", ...}], each family's fit
    written by the family itself (files named after it), its entry in the manifest the rest of the
    dict plus what the family's `save` returns. The manifest records each file's SHA-256, its own
    (`manifest_sha256`) and a content-derived `model_version` (`content_version`), so a changed
    threshold, weight or schema is refused on loading."""
    reserved = set(manifest) & {"format_version", "files", "members", *UNVERSIONED[:2]}
    if reserved:
        raise ValueError(f"save_model writes {', '.join(sorted(reserved))} itself")
    names = [m["family"] for m in members]
    if not members or len(set(names)) != len(names):
        raise ValueError(f"a model has one member per family, at least one: not {names}")
    model_dir.mkdir(parents=True, exist_ok=True)
    entries, files = [], [CALIBRATOR_FILE]
    for member in members:
        entry = {k: v for k, v in member.items() if k != "fitted"}
        entry |= family(member["family"]).save(member["fitted"], model_dir, member["family"])
        entries.append(entry)
        files += entry["files"]
    (model_dir / CALIBRATOR_FILE).write_text(json.dumps(calibrator.to_dict(), indent=2) + "\n")
    if examples is not None:
        (model_dir / EXAMPLES_FILE).write_text(json.dumps(examples, indent=1) + "\n")
        files.append(EXAMPLES_FILE)
    # through JSON text and back before hashing: what is hashed is what a reader parses (tuples come back as
    # lists, numeric keys as strings)
    content = json.loads(json.dumps({"format_version": FORMAT_VERSION, **manifest, "members": entries,
                                     "files": {name: file_sha256(model_dir / name) for name in files}}))
    manifest = {"format_version": FORMAT_VERSION, "model_version": content_version(content), **content}
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    (model_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_model_dir(model_dir: str | Path) -> dict:
    """Read the manifest and check it and every file against their checksums, without loading any
    member (so a process that will fork, like gunicorn's master, can check a model and stay free of
    XGBoost's and torch's thread pools, which do not survive a fork). Any problem is a RareMLError."""
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
    if manifest.get("format_version") in (2, FORMAT_VERSION):
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
    try:
        members = members_of(manifest)
        needed = {CALIBRATOR_FILE} | {name for m in members for name in m["files"]}
    except (KeyError, TypeError):
        raise RareMLError(f"{path} does not list its members") from None
    if not isinstance(files, dict) or not needed <= set(files) <= needed | {EXAMPLES_FILE}:
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
    legacy = hashlib.sha256(f"{files.get(LEGACY_BOOSTER)}{files.get(CALIBRATOR_FILE)}".encode()).hexdigest()[:12]
    return "manifest_sha256" not in manifest and manifest.get("model_version") == legacy


def load_model(model_dir: str | Path) -> Model:
    """Load the model folder, verifying every checksum first; any problem is a RareMLError."""
    manifest = verify_model_dir(model_dir)
    model_dir = Path(model_dir)
    schema = Schema.from_dict(manifest["schema"])
    members = [Member(m["family"], float(m["weight"]), family(m["family"]).load(model_dir, m, schema), m)
               for m in members_of(manifest)]
    calibrator = Calibrator.from_dict(json.loads((model_dir / CALIBRATOR_FILE).read_text()))
    return Model(members, calibrator, schema, manifest, model_dir)
