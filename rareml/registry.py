"""Which model serves. Every registered model is an immutable copy of its folder under
`artifacts/models/<model_version>/`, and the aliases `champion` (what the API, the GUI and the Space
serve), `challenger` (the newest model, until a gate or a person promotes it) and `previous` (the
champion before the last promotion, for a rollback) are symbolic links beside them, each changed
atomically: a link written aside, then renamed over the old one, so a reader sees the old folder or
the new one, never half of either. When a model was registered in MLflow, its registered-model
aliases are moved the same way, so `models:/NAME@champion` names the same model. An API replica on
another machine mirrors that MLflow alias into its own folder (`mirror`) and follows it from there.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from rareml.errors import RareMLError
from rareml.model import verify_model_dir

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
ALIASES = (CHAMPION, CHALLENGER, PREVIOUS)
MODELS = "models"
GATES = "gates"  # <version>.json: the gate's decision and evidence on that version (06_retrain.py)
_VERSION = re.compile(r"[0-9a-f]{12}")  # content_version: 12 hex digits


def version_of(root: Path, alias: str) -> str | None:
    """The model version an alias points to under the artifacts folder `root`, or None."""
    link = _link(root, alias)
    return Path(os.readlink(link)).name if link.is_symlink() else None


def gate_of(model_dir: Path) -> dict | None:
    """The gate's decision on the model in `models/<version>` (written by 06_retrain.py), if any."""
    folder = Path(model_dir).resolve()
    path = folder.parent.parent / GATES / f"{folder.name}.json"
    if folder.parent.name != MODELS or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # the evidence is unreadable, not the model
        log.warning("cannot read the gate's decision %s: %s", path.name, exc)
        return None


def _link(root: Path, alias: str) -> Path:
    """Where an alias lives; a RareMLError if something else sits there (never replaced: not ours)."""
    link = Path(root) / alias
    if link.exists() and not link.is_symlink():  # e.g. an artifacts folder copied with its links followed
        raise RareMLError(f"{link} is not an alias link but a {'folder' if link.is_dir() else 'file'}: "
                          "move it away (copy artifacts folders with `cp -a`, which keeps links)")
    return link


def serving_dir(root: Path) -> Path:
    """The folder to serve: the champion's (resolved, so a later promotion does not change what an
    already running process reads), or `root/model` when no model was ever registered here."""
    root = Path(root)
    version = version_of(root, CHAMPION)
    return (root / MODELS / version).resolve() if version else root / "model"


def publish(root: Path, model_dir: Path) -> str:
    """Copy a verified model folder to `models/<version>` (once: a version names its content) and
    return the version. A RareMLError if the folder is missing, corrupt or tampered with."""
    manifest = verify_model_dir(model_dir)
    version = manifest["model_version"]
    target = Path(root) / MODELS / version
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        aside = target.with_name(f".{version}.{os.getpid()}.partial")
        shutil.copytree(model_dir, aside)
        try:
            os.replace(aside, target)  # a whole folder appears at once
        except OSError:
            shutil.rmtree(aside, ignore_errors=True)  # ours, just made
            if not target.is_dir():  # else another process published the same version meanwhile: fine
                raise
    verify_model_dir(target)
    return version


def set_alias(root: Path, alias: str, version: str) -> None:
    """Point `alias` at `models/<version>`, atomically (refused for a version not published here)."""
    if alias not in ALIASES:
        raise RareMLError(f"unknown alias {alias!r}: one of {', '.join(ALIASES)}")
    root = Path(root)
    _folder(root, version)
    link = _link(root, alias)
    aside = root / f".{alias}.{os.getpid()}.link"
    aside.unlink(missing_ok=True)
    os.symlink(Path(MODELS) / version, aside)
    os.replace(aside, link)


def _folder(root: Path, version: str) -> Path:
    """`models/<version>`, or a RareMLError naming the versions there are."""
    folder = Path(root) / MODELS / version
    if not _VERSION.fullmatch(version) or not folder.is_dir():
        known = sorted(p.name for p in folder.parent.glob("*") if p.is_dir() and not p.name.startswith("."))
        raise RareMLError(f"no model {version!r} in {folder.parent} (known: {', '.join(known) or 'none'})")
    return folder


def register(root: Path, model_dir: Path) -> dict:
    """A newly trained model: published, aliased `challenger`, and `champion` too when there is
    none yet (the first model of this artifacts folder). Returns the aliases it got."""
    version = publish(root, model_dir)
    set_alias(root, CHALLENGER, version)
    aliases = [CHALLENGER]
    if version_of(root, CHAMPION) is None:
        set_alias(root, CHAMPION, version)
        aliases.append(CHAMPION)
    return {"version": version, "aliases": aliases}


def promote(root: Path, version: str | None = None) -> dict:
    """`champion` -> `version` (default: the challenger); the old champion becomes `previous`.
    The champion's link changes last: a crash in between leaves the old champion serving."""
    version = version or version_of(root, CHALLENGER)
    if version is None:
        raise RareMLError(f"no challenger in {root}: train one (make all), or name a version")
    old = version_of(root, CHAMPION)
    if old == version:
        return {CHAMPION: version, PREVIOUS: version_of(root, PREVIOUS), "changed": False}
    verify_model_dir(_folder(root, version))  # never promote a folder changed since it was published
    if old:
        set_alias(root, PREVIOUS, old)
    set_alias(root, CHAMPION, version)
    return {CHAMPION: version, PREVIOUS: old, "changed": True}


def rollback(root: Path) -> dict:
    """`champion` <-> `previous`: the model served before the last promotion serves again."""
    previous = version_of(root, PREVIOUS)
    if previous is None:
        raise RareMLError(f"nothing to roll back to in {root}: no model was ever promoted over another")
    return promote(root, previous)


def mlflow_versions(name: str) -> tuple[object, dict[str, str]] | None:
    """(an MLflow client, {model version: its MLflow version}) for the registered model `name`, at
    MLFLOW_TRACKING_URI or ./mlruns as for the stages; None (and a warning) if the registry cannot
    be read: the local aliases and files are what serves."""
    import mlflow

    from rareml.tracking import use_tracking_store

    use_tracking_store()
    client = mlflow.MlflowClient()
    try:
        return client, {v.tags.get("model_version"): v.version for v in client.search_model_versions(f"name='{name}'")}
    except Exception as exc:  # noqa: BLE001 (no registry here)
        log.warning("cannot read MLflow's registry for %s: %s", name, exc)
        return None


def sync_mlflow(name: str, versions: dict[str, str | None]) -> dict[str, str]:
    """Move the MLflow registered-model aliases of `name` to the MLflow versions tagged with these
    model versions ({alias: model_version}); returns {alias: MLflow version} for those moved. The
    tracking store is MLFLOW_TRACKING_URI or ./mlruns, as for the stages."""
    registered = mlflow_versions(name)
    if registered is None:
        return {}
    client, found = registered
    moved = {}
    for alias, version in versions.items():
        if version in found:
            client.set_registered_model_alias(name, alias, found[version])
            moved[alias] = found[version]
        elif version is not None:
            log.warning("model %s is not registered in MLflow as %s: alias %s not moved there", version, name, alias)
    return moved


_MODEL_URI = re.compile(r"models:/([^/@]+)@([A-Za-z0-9_-]+)")


def mirror(root: Path, uri: str, lock_seconds: float = 120.0) -> str:
    """Make the model MLflow names `models:/NAME@ALIAS` the champion of the artifacts folder `root`:
    downloaded once per version (the registered pyfunc's model folder, plain files: nothing in it is
    run or unpickled), verified, published, then promoted here (the old champion: `previous`), so
    the API's workers swap to it as after a local promotion. MLflow is MLFLOW_TRACKING_URI (a
    tracking server, or a shared store); a server that does not answer fails within seconds, not
    after MLflow's default minutes of retries. One process at a time per folder. Returns the version
    now champion; a RareMLError if the alias cannot be read or does not name a sound rareml model."""
    found = _MODEL_URI.fullmatch(uri)
    if not found:
        raise RareMLError(f"model URI {uri!r}: expected models:/NAME@ALIAS (e.g. models:/census-income-kdd@champion)")
    name, alias = found.groups()
    for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
                       ("MLFLOW_DISABLE_TELEMETRY", "true")):
        os.environ.setdefault(key, value)
    try:
        import mlflow
    except ImportError:
        raise RareMLError(f"following {uri} needs MLflow, not installed here: pip install -r requirements.txt") from None

    from rareml.tracking import use_tracking_store

    where = use_tracking_store()
    try:
        registered = mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except Exception as exc:  # noqa: BLE001 (unreachable server, unknown name or alias: all say the same)
        raise RareMLError(f"cannot read {uri} at {where}: {_first_line(exc)}") from None
    version = registered.tags.get("model_version", "")
    if not _VERSION.fullmatch(version):
        raise RareMLError(f"{uri} (MLflow version {registered.version}) has no model_version tag: not a rareml model")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".mirror.lock", lock_seconds):
        if not (root / MODELS / version).is_dir():
            download = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
            try:
                mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{registered.version}",
                                                    dst_path=str(download))
                held = verify_model_dir(download / "artifacts" / "model")["model_version"]
                if held != version:
                    raise RareMLError(f"{uri} is tagged model_version {version} but holds model {held}")
                publish(root, download / "artifacts" / "model")
            except RareMLError:
                raise
            except Exception as exc:  # noqa: BLE001 (network, disk: the champion here keeps serving)
                raise RareMLError(f"cannot download {uri} (MLflow version {registered.version}): "
                                  f"{_first_line(exc)}") from None
            finally:
                shutil.rmtree(download, ignore_errors=True)  # ours, made above
        promote(root, version)
    return version


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


@contextlib.contextmanager
def _locked(path: Path, seconds: float):
    """An exclusive lock on `path` (fcntl), waited for at most `seconds`."""
    import fcntl
    import time

    with open(path, "w") as lock:
        deadline = time.monotonic() + seconds
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RareMLError(f"{path} stayed locked for {seconds:g} s: another process is mirroring") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
