"""Champion and challenger, as users meet them: the first `make all` of an artifacts folder serves
its model; a second one registers a challenger that does not serve until it is promoted; promote
and rollback move the local aliases atomically and MLflow's registered-model aliases with them; a
tampered model is never promoted. Real stages, real MLflow (a file store in the test's folder)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import mlflow
import pytest

from rareml import registry
from rareml.errors import RareMLError
from rareml.model import verify_model_dir
from tests.conftest import copy_project, run_stage


@pytest.fixture(scope="module")
def twice(trained, census_small, tmp_path_factory) -> Path:
    """A copy of the trained folder (artifacts and mlruns), serialized a second time."""
    work = tmp_path_factory.mktemp("twice")
    copy_project(trained, work)
    run_stage("03_serialize.py", "--config", str(census_small), "--artifacts", str(work / "artifacts"),
              "--bootstrap", "50", cwd=work)
    return work


def aliases_in_mlflow(work: Path, name: str = "census-small") -> dict[str, str]:
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = mlflow.MlflowClient(tracking_uri=str(work / "mlruns"))
    return {alias: str(client.get_model_version_by_alias(name, alias).version)
            for alias in registry.ALIASES if _has(client, name, alias)}


def _has(client, name: str, alias: str) -> bool:
    try:
        client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def test_the_first_model_of_an_artifacts_folder_is_champion_and_challenger(trained):
    root = trained / "artifacts"
    first = json.loads((root / "serialized.json").read_text())
    version = first["model_version"]
    assert first["aliases"] == ["challenger", "champion"]
    assert registry.version_of(root, "champion") == registry.version_of(root, "challenger") == version
    assert registry.serving_dir(root) == (root / "models" / version).resolve()
    assert verify_model_dir(registry.serving_dir(root))["lineage"]["parent"] is None
    assert aliases_in_mlflow(trained) == {"champion": "1", "challenger": "1"}


def test_a_second_model_is_a_challenger_that_does_not_serve_until_promoted(twice, census_small):
    root = twice / "artifacts"
    first = registry.version_of(root, "champion")
    second = json.loads((root / "serialized.json").read_text())
    assert second["aliases"] == ["challenger"] and second["model_version"] != first
    assert registry.version_of(root, "challenger") == second["model_version"]
    assert registry.serving_dir(root).name == first  # make serve still serves the first
    manifest = verify_model_dir(root / "models" / second["model_version"])
    assert manifest["lineage"]["parent"] == first
    assert manifest["lineage"]["window"] == {"column": "year", "from": 94, "to": 94}
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    tags = mlflow.MlflowClient(tracking_uri=str(twice / "mlruns")).get_model_version("census-small", "2").tags
    assert tags["lineage.parent_model_version"] == first and tags["lineage.parent_mlflow_version"] == "1"
    assert tags["lineage.data_sha256"] == manifest["data"]["fingerprint"]["data_file_sha256"]
    assert aliases_in_mlflow(twice) == {"champion": "1", "challenger": "2"}

    args = ["--config", str(census_small), "--artifacts", str(root)]
    out = run_stage("03_serialize.py", *args, "--promote", cwd=twice).stdout
    assert f"champion:     {second['model_version']} (was {first}" in out
    assert registry.serving_dir(root).name == second["model_version"]
    assert registry.version_of(root, "previous") == first
    assert aliases_in_mlflow(twice) == {"champion": "2", "challenger": "2", "previous": "1"}
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no link or copy left aside

    run_stage("03_serialize.py", *args, "--rollback", cwd=twice)
    assert registry.serving_dir(root).name == first and registry.version_of(root, "previous") == second["model_version"]
    assert aliases_in_mlflow(twice) == {"champion": "1", "challenger": "2", "previous": "2"}

    run_stage("03_serialize.py", *args, "--promote", "--no-mlflow", cwd=twice)  # the local aliases only
    assert registry.serving_dir(root).name == second["model_version"]
    assert aliases_in_mlflow(twice) == {"champion": "1", "challenger": "2", "previous": "2"}
    run_stage("03_serialize.py", *args, "--rollback", "--no-mlflow", cwd=twice)

    unknown = run_stage("03_serialize.py", *args, "--promote", "0123456789ab", cwd=twice, check=False)
    assert unknown.returncode != 0 and "no model '0123456789ab'" in unknown.stderr and "Traceback" not in unknown.stderr
    assert registry.serving_dir(root).name == first


def test_a_tampered_model_is_never_promoted(twice, tmp_path):
    root = tmp_path / "artifacts"
    shutil.copytree(twice / "artifacts", root, symlinks=True)
    challenger = registry.version_of(root, "challenger")
    champion = registry.version_of(root, "champion")
    assert challenger != champion
    victim = root / "models" / challenger / "calibrator.json"
    victim.write_text(victim.read_text().replace("0", "1", 1))
    with pytest.raises(RareMLError, match="does not match its checksum"):
        registry.promote(root)
    assert registry.version_of(root, "champion") == champion


def test_a_worker_follows_the_champion_refuses_a_bad_one_and_tries_it_again_once_mended(twice, tmp_path):
    """The follower of one worker, in process: a tampered champion is refused once (not reloaded at
    every look), the old model keeps serving; once the alias has moved back, the mended one swaps in."""
    import importlib

    from rareml.service import Follower

    root = tmp_path / "artifacts"
    shutil.copytree(twice / "artifacts", root, symlinks=True)
    first, second = registry.version_of(root, "champion"), registry.version_of(root, "challenger")
    app = importlib.import_module("04_serve").create_app(registry.serving_dir(root), tmp_path / "log.db",
                                                         refresh=3600)
    follower, client = Follower(app.extensions["rareml"], root), app.test_client()
    assert follower.check() is None
    victim = root / "models" / second / "calibrator.json"
    good = victim.read_text()
    victim.write_text(good.replace("0", "1", 1))
    registry.set_alias(root, "champion", second)  # by hand, past promote's own check
    assert follower.check() == "refused" and follower.check() is None  # refused once, not at every look
    victim.write_text(good)
    assert follower.check() is None  # mended, but the alias has not moved
    registry.set_alias(root, "champion", first)
    assert follower.check() is None and follower.refused is None
    registry.set_alias(root, "champion", second)
    assert follower.check() == "ok"
    answer = client.post("/predict/batch", json={"records": json.loads((root / "models" / second / "examples.json")
                                                                         .read_text())["positive"][:2]})
    assert answer.status_code == 200 and answer.headers["X-Model-Version"] == second  # the Flask path's header
    assert client.get("/model").get_json()["model_version"] == second


def test_aliases_refuse_what_is_not_a_published_version(twice, tmp_path):
    root = tmp_path / "artifacts"
    shutil.copytree(twice / "artifacts", root, symlinks=True)
    for bad in ("../model", "ABCDEF012345", "", "x" * 12):
        with pytest.raises(RareMLError, match="no model"):
            registry.set_alias(root, "champion", bad)
    with pytest.raises(RareMLError, match="unknown alias"):
        registry.set_alias(root, "latest", registry.version_of(root, "champion"))
    copied = tmp_path / "copied"  # copied with its links followed: the aliases are folders now
    shutil.copytree(root, copied)
    with pytest.raises(RareMLError, match="not an alias link but a folder"):
        registry.promote(copied)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert registry.serving_dir(empty) == empty / "model"  # nothing registered: the plain model folder
    with pytest.raises(RareMLError, match="nothing to roll back"):
        registry.rollback(empty)
    assert os.listdir(empty) == []


def test_a_promotion_is_swapped_into_running_workers_with_no_failed_request(twice, tmp_path):
    """Real gunicorn (2 workers) on a folder whose champion is v1: a client keeps sending while the
    challenger is promoted; every answer is a 200, each names the model that made it (body and
    header), and soon every worker answers with the new one. Then a champion whose folder was
    tampered with is refused by every worker, and the model before it keeps serving."""
    import threading
    from collections import Counter

    import pandas as pd

    from rareml.features import to_records
    from rareml.model import load_model
    from tests.integration.test_gunicorn import Server, call, scrape, total

    root = tmp_path / "artifacts"
    shutil.copytree(twice / "artifacts", root, symlinks=True)
    first, second = registry.version_of(root, "champion"), registry.version_of(root, "challenger")
    records = to_records(pd.read_parquet(root / "test.parquet").head(200), load_model(root / "model").schema)
    bodies = [json.dumps(r).encode() for r in records]
    server = Server(root, tmp_path / "log.db", tmp_path / "server.log", "--reload-seconds", "0.5")
    try:
        server.wait_ready()
        answers, stop = [], threading.Event()

        def client() -> None:
            i = 0
            while not stop.is_set() and i < 20_000:
                status, body = call(server.port, "POST", "/predict", bodies[i % len(bodies)])
                answers.append((status, json.loads(body).get("model_version")))
                i += 1

        thread = threading.Thread(target=client)
        thread.start()
        time.sleep(1.0)
        registry.promote(root)
        swapped = None
        for _ in range(300):  # until 40 answers in a row come from the new model (both workers)
            time.sleep(0.05)
            if len(answers) > 40 and all(v == second for _, v in answers[-40:]):
                swapped = len(answers)
                break
        time.sleep(0.5)
        stop.set()
        thread.join(timeout=60)
        assert swapped is not None, Counter(v for _, v in answers)
        assert Counter(s for s, _ in answers) == Counter({200: len(answers)})
        versions = [v for _, v in answers]
        assert versions[0] == first and set(versions) == {first, second}
        headers = _headers(server.port, bodies[0])
        assert headers["X-Model-Version"] == second
        assert json.loads(call(server.port, "GET", "/model")[1])["model_version"] == second
        metrics = scrape(server.port)
        assert total(metrics, "rareml_model_reloads_total", result="ok") == 2  # once per worker
        assert total(metrics, "rareml_model_info", version=second) == 1
        assert total(metrics, "rareml_model_info", version=first) == 0

        victim = root / "models" / first / "calibrator.json"  # tampered, then made champion behind the gate's back
        victim.write_text(victim.read_text().replace("0", "1", 1))
        registry.set_alias(root, "champion", first)
        for _ in range(100):
            time.sleep(0.1)
            if total(scrape(server.port), "rareml_model_reloads_total", result="refused") >= 2:
                break
        assert total(scrape(server.port), "rareml_model_reloads_total", result="refused") == 2
        for body in bodies[:20]:
            status, out = call(server.port, "POST", "/predict", body)
            assert status == 200 and json.loads(out)["model_version"] == second
        assert "refused" in (tmp_path / "server.log").read_text()
    finally:
        server.stop()


def _headers(port: int, body: bytes) -> dict[str, str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return dict(response.getheaders())
    finally:
        conn.close()


def test_a_replica_mirrors_the_mlflow_alias_and_follows_it(twice, tmp_path, monkeypatch):
    """An API on "another machine": an empty artifacts folder and `--model-uri models:/NAME@champion`
    over MLflow's registry (MLFLOW_TRACKING_URI). It downloads and serves MLflow's champion; when
    the alias moves in MLflow, both workers swap to the new model; an unknown alias is a one-line
    error at start."""
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.integration.test_gunicorn import Server, call, scrape, total

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=str(twice / "mlruns"))
    by_mlflow = {str(v.version): v.tags["model_version"] for v in client.search_model_versions("name='census-small'")}
    first, second = by_mlflow["1"], by_mlflow["2"]
    env = {"MLFLOW_TRACKING_URI": str(twice / "mlruns")}
    bad = subprocess.run([sys.executable, str(ROOT / "04_serve.py"), "--artifacts", str(tmp_path / "none"),
                          "--model-uri", "models:/census-small@nope"], capture_output=True, text=True, timeout=120,
                         env=os.environ | env, check=False)
    assert bad.returncode == 2 and "cannot read models:/census-small@nope" in bad.stderr
    assert "Traceback" not in bad.stderr

    replica = tmp_path / "replica"
    server = Server(replica, tmp_path / "log.db", tmp_path / "server.log", "--reload-seconds", "0.4",
                    "--model-uri", "models:/census-small@champion", env=env)
    try:
        server.wait_ready(120)
        assert json.loads(call(server.port, "GET", "/model")[1])["model_version"] == first
        assert registry.version_of(replica, "champion") == first and not (replica / "mlruns").exists()
        client.set_registered_model_alias("census-small", "champion", "2")
        for _ in range(150):
            time.sleep(0.2)
            if total(scrape(server.port), "rareml_model_reloads_total", result="ok") >= 2:
                break
        metrics = scrape(server.port)
        assert total(metrics, "rareml_model_reloads_total", result="ok") == 2  # both workers
        assert total(metrics, "rareml_model_info", version=first) == 0
        for _ in range(10):
            status, body = call(server.port, "POST", "/predict", json.dumps(_record(replica)).encode())
            assert status == 200 and json.loads(body)["model_version"] == second
        assert registry.version_of(replica, "champion") == second and registry.version_of(replica, "previous") == first
        assert sorted(p.name for p in (replica / "models").iterdir()) == sorted([first, second])  # no download left
    finally:
        client.set_registered_model_alias("census-small", "champion", "1")
        server.stop()


def _record(root: Path) -> dict:
    """A record from the served model's own examples (a replica has no data files)."""
    return json.loads((registry.serving_dir(root) / "examples.json").read_text())["positive"][0]
