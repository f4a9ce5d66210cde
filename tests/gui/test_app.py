"""The Gradio GUI (app.py) over the session's trained model: its API through gradio_client, local
and API scoring giving the same answers, the Space folder run as the Space runs it, and a real
browser (Debian's chromium driven by Playwright) loading an example, editing it and predicting."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from rareml.model import load_model
from rareml.processes import free_port, stop_group, wait_http
from rareml.scoring import ApiScorer, LocalScorer
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(os.environ.get("RAREML_TEST_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.fixture(scope="module")
def app_module():
    return importlib.import_module("app")


@pytest.fixture(scope="module")
def artifacts(trained) -> Path:
    return trained / "artifacts"


@pytest.fixture(scope="module")
def model(artifacts):
    return load_model(artifacts / "model")


@pytest.fixture(scope="module")
def served_app(app_module, artifacts):
    """The app in this process, on a free port, as `make gui` serves it."""
    demo = app_module.build(artifacts)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def form_values(app_module, model, record: dict) -> list:
    return [record.get(f.name) for f in app_module.feature_order(model)]


def test_form_puts_the_most_important_features_first(app_module, model):
    order = [f.name for f in app_module.feature_order(model)]
    importance = model.manifest["importance"]
    assert sorted(order) == sorted(model.schema.names)
    assert [importance[n] for n in order] == sorted(importance.values(), reverse=True)


def test_gradio_client_scores_like_the_model(served_app, app_module, model):
    from gradio_client import Client

    client = Client(served_app, verbose=False)
    examples = model.examples()
    assert len(examples["positive"]) > 0 and len(examples["negative"]) > 0
    for outcome in ("positive", "negative"):
        loaded = client.predict(outcome, api_name="/load_example")
        values = list(loaded[:len(model.schema.names)])
        index = int(re.search(rf"Loaded {outcome} example (\d+) of", loaded[-1]).group(1)) - 1
        assert values == form_values(app_module, model, examples[outcome][index])
        probability, verdict, _ = client.predict(*values, api_name="/predict")
        record = app_module.to_record(app_module.feature_order(model), values)
        expected = float(model.predict_proba([record])[0])
        assert abs(float(probability) - expected) <= 5e-7
        assert ("Decision: positive" in verdict) == (expected >= model.threshold)


def test_local_and_api_scoring_give_the_same_answer(model, artifacts, tmp_path):
    from werkzeug.serving import make_server

    serve = importlib.import_module("04_serve")
    server = make_server("127.0.0.1", 0, serve.create_app(artifacts / "model", tmp_path / "log.db"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        api, local = ApiScorer(f"http://127.0.0.1:{server.server_port}"), LocalScorer(model)
        for record in model.examples()["positive"][:5] + model.examples()["negative"][:5]:
            a, b = api.score(record), local.score(record)
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-12) and a["decision"] == b["decision"]
            assert [t["feature"] for t in a["explanation"]["top"]] == [t["feature"] for t in b["explanation"]["top"]]
            np.testing.assert_allclose([t["contribution"] for t in a["explanation"]["top"]],
                                       [t["contribution"] for t in b["explanation"]["top"]], rtol=1e-6)
            assert a["prediction_id"]  # the API logged it
    finally:
        server.shutdown()
        thread.join(10)


def test_space_folder_runs_as_the_space_does(artifacts, model, tmp_path):
    """`make space` output, started with `python app.py` from inside it, with none of the training
    or serving packages importable: the Space's requirements.txt is all it has."""
    from gradio_client import Client

    from rareml.space import build_space

    space = build_space(artifacts, tmp_path / "space")
    readme = (space / "README.md").read_text()
    assert "sdk: gradio" in readme and "app_file: app.py" in readme and "sdk_version: " in readme
    requirements = (space / "requirements.txt").read_text()
    assert "xgboost-cpu==" in requirements and "\nxgboost==" not in requirements and "mlflow" not in requirements
    (tmp_path / "guard").mkdir()
    (tmp_path / "guard" / "sitecustomize.py").write_text(
        "import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'sklearn', 'mlflow', 'optuna', 'flask', 'prometheus_client', 'pyarrow'}:\n"
        "            raise ImportError(f'{name} is not in the Space')\nsys.meta_path.insert(0, Block())\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("ARTIFACTS", "RAREML_API_URL")}
    env |= {"GRADIO_SERVER_PORT": str(port), "PYTHONPATH": str(tmp_path / "guard")}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "space.log", "wb"))  # noqa: SIM115
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc, seconds=90)
        record = model.examples()["negative"][1]
        import app as app_module

        values = form_values(app_module, model, record)
        probability, _, _ = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(*values, api_name="/predict")
        assert abs(float(probability) - float(model.predict_proba([record])[0])) <= 5e-7
    finally:
        stop_group(proc)
    assert "is not in the Space" not in (tmp_path / "space.log").read_text()


@pytest.mark.browser
def test_browser_load_edit_predict(app_module, model, artifacts, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("RAREML_REQUIRE_BROWSER"):
            pytest.fail("RAREML_REQUIRE_BROWSER is set but /usr/bin/chromium is missing (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--artifacts", str(artifacts), "--port", str(port)],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "gui.log", "wb"))  # noqa: SIM115
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc, seconds=90)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
                page.wait_for_selector("#load-example", timeout=60000)
                page.get_by_label("negative").check()
                page.click("#load-example")
                page.wait_for_function("document.querySelector('#example-note').innerText.includes('negative')",
                                       timeout=20000)
                record = dict(model.examples()["negative"][0])
                assert float(page.input_value("#f-age input")) == record["age"]
                record["age"] = 47
                page.fill("#f-age input", "47")
                page.click("#predict")
                page.wait_for_function("document.querySelector('#probability textarea').value !== ''", timeout=20000)
                shown = float(page.input_value("#probability textarea"))
                SHOTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SHOTS / "gui-predict.png"), full_page=True)
                decision = page.inner_text("#decision")
            finally:
                browser.close()
    finally:
        stop_group(proc)
    expected = float(model.predict_proba([record])[0])
    assert abs(shown - expected) <= 5e-7, (shown, expected)
    assert ("Decision: positive" in decision) == (expected >= model.threshold)
