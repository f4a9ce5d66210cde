"""The Gradio GUI (app.py) over the session's trained model: its API through gradio_client, local
and API scoring giving the same answers (raw rows of the table included), the upload limit, the
Space folder run as the Space runs it, and a real browser (Debian's chromium driven by Playwright)
loading an example, editing it and predicting, and showing the model card's figures whole."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from rareml.model import load_model
from rareml.processes import free_port, stop_group, wait_http
from rareml.scoring import ApiScorer, LocalScorer
from tests.conftest import ROOT, chromium_page

pytestmark = pytest.mark.slow
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
    app_module.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
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


def assert_upload_limit(url: str, limit: int) -> None:
    """Gradio's upload route (there whether or not the app has an upload component) refuses a file
    one byte over the limit, and still takes a small one."""
    too_big = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.csv", b"0" * (limit + 1))}, timeout=60)
    assert too_big.status_code == 413 and str(limit) in too_big.text
    assert httpx.post(f"{url}gradio_api/upload", files={"files": ("small.csv", b"a\n1\n")}, timeout=60).is_success


def test_uploads_beyond_the_limit_are_refused(served_app, app_module):
    assert app_module.MAX_FILE_SIZE <= 16 * 2**20  # the app takes no files: a small limit
    assert_upload_limit(served_app, app_module.MAX_FILE_SIZE)


def raw_rows(census_small: Path, n: int) -> list[dict]:
    """Rows of the user's own table as they are, every column (missing as null), as a client sends them."""
    table = pd.read_parquet(census_small.parent / "census_small.parquet").head(n)
    return [{k: None if pd.isna(v) else v for k, v in row.items()} for row in table.to_dict("records")]


def test_local_and_api_scoring_give_the_same_answer(model, artifacts, tmp_path, census_small):
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
        # a raw row of the table (the columns the pipeline dropped, the target, the year) is scored as its features
        assert {"instance_weight", "income_gt_50k", "year"} <= set(model.schema.ignored)
        for row in raw_rows(census_small, 5):
            assert set(model.schema.ignored) <= set(row)
            features = {k: row[k] for k in model.schema.names}
            a, b, c = api.score(row), local.score(row), local.score(features)
            assert a["probability"] == pytest.approx(c["probability"], abs=1e-12) and b == c
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
        import app as app_module

        assert_upload_limit(f"http://127.0.0.1:{port}/", app_module.MAX_FILE_SIZE)
        record = model.examples()["negative"][1]

        values = form_values(app_module, model, record)
        probability, _, _ = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(*values, api_name="/predict")
        assert abs(float(probability) - float(model.predict_proba([record])[0])) <= 5e-7
    finally:
        stop_group(proc)
    assert "is not in the Space" not in (tmp_path / "space.log").read_text()


@contextmanager
def browser_on_app(artifacts: Path, tmp_path: Path):
    """A chromium page on `python app.py` (as `make gui` starts it), 1400x1000."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--artifacts", str(artifacts), "--port", str(port)],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "gui.log", "wb"))  # noqa: SIM115
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc, seconds=90)
        with chromium_page(1400) as page:
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.wait_for_selector("#load-example", timeout=60000)
            yield page
    finally:
        stop_group(proc)


@pytest.mark.browser
def test_browser_load_edit_predict(app_module, model, artifacts, tmp_path):
    with browser_on_app(artifacts, tmp_path) as page:
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
    expected = float(model.predict_proba([record])[0])
    assert abs(shown - expected) <= 5e-7, (shown, expected)
    assert ("Decision: positive" in decision) == (expected >= model.threshold)


# Each figure's drawn size and box: the image's own aspect, nothing outside its component's box.
FIGURE_GEOMETRY = """id => { const box = document.getElementById(id), img = box && box.querySelector('img');
  if (!img || !img.complete || !img.naturalWidth) return null;
  const r = img.getBoundingClientRect(), b = box.getBoundingClientRect();
  return {natural: img.naturalWidth / img.naturalHeight, shown: r.width / r.height, fit: getComputedStyle(img).objectFit,
          inside: r.left >= b.left - 1 && r.right <= b.right + 1 && r.top >= b.top - 1 && r.bottom <= b.bottom + 1}; }"""


@pytest.mark.browser
def test_browser_model_card_shows_every_figure_whole(app_module, artifacts, tmp_path):
    expected = [name for row in app_module.REPORTS for name in row if (artifacts / "reports" / name).is_file()]
    assert "pr_roc.png" in expected  # the wide figure a gallery cropped
    with browser_on_app(artifacts, tmp_path) as page:
        page.get_by_role("tab", name="Model card").click()
        geometry = {}
        for name in expected:
            element = f"report-{Path(name).stem}"
            page.wait_for_function(f"({FIGURE_GEOMETRY})('{element}') !== null", timeout=20000)
            page.locator(f"#{element}").scroll_into_view_if_needed()
            geometry[name] = page.evaluate(f"({FIGURE_GEOMETRY})('{element}')")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "gui-model-card.png"), full_page=True)
    for name, g in geometry.items():
        assert g["fit"] != "cover" and g["inside"], (name, g)
        assert g["shown"] == pytest.approx(g["natural"], rel=0.02), (name, g)  # not cropped, not stretched
