"""make report on the model the suite trains: the HTML has every section, figure and link, each
image embedded from a file the run wrote; the PDFs have a title page and a table of contents with
page numbers and render to non-blank PNGs (pdftoppm); the deck has 12-15 slides whose notes' times
add up to 12 minutes, and it pages in a real browser. With Prometheus, Alertmanager and Chromium
installed (as .ci/run installs them), the monitoring screenshots and dashboard panels are taken
for this model by monitoring/screenshots.py."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from markupsafe import escape

from rareml import registry, report
from rareml.artifacts import read_json, write_json
from rareml.config import load_config
from tests.conftest import ROOT, chromium_page, copy_project, require_chromium, run_stage

pytestmark = pytest.mark.slow
REPO, SPACE = "https://github.com/example/rareml", "example/rareml-space"
PDF_TOOLS = ("pdftoppm", "pdftotext", "pdfinfo")


def monitoring_ready() -> bool:
    have = bool(shutil.which("prometheus") and (shutil.which("prometheus-alertmanager") or shutil.which("alertmanager"))
                and Path("/usr/bin/chromium").exists())
    if not have and os.environ.get("RAREML_REQUIRE_MONITORING"):
        pytest.fail("RAREML_REQUIRE_MONITORING is set but Prometheus, Alertmanager or chromium is missing")
    return have


def require_pdf_tools() -> None:
    if not all(shutil.which(t) for t in PDF_TOOLS):
        if os.environ.get("RAREML_REQUIRE_PDF"):
            pytest.fail("RAREML_REQUIRE_PDF is set but poppler-utils is missing (apt-get install poppler-utils)")
        pytest.skip("poppler-utils (pdftoppm, pdftotext) is not installed; .ci/run installs it")


def seed_retraining(project: Path) -> str:
    """A runs/<time>/gate.json as 06_retrain.py writes it, from the real gate on the model's own test
    split scored by the champion and by itself (the timeline's input; a real retraining is
    tests/integration/test_retrain.py's job)."""
    from rareml.model import load_model
    from rareml.retrain import gate

    root = project / "artifacts"
    version = registry.version_of(root, registry.CHAMPION)
    model = load_model(root / registry.MODELS / version)
    test = pd.read_parquet(root / "test.parquet")
    y = test["_label"].to_numpy()
    p = model.predict_proba(test)
    config = load_config(read_json(root / "prepared.json")["config"]["path"])
    decision = gate(y, p, p, (p >= model.threshold, p >= model.threshold), {}, config.retrain, 0.2, n_boot=200)
    name = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run = root / "runs" / name
    write_json(run / "gate.json", decision | {"champion": version, "challenger": version, "run": name,
                                              "alert": {"alertname": "RareMLConceptDrift"}})
    write_json(run / "run.json", {"started": 0, "champion": version, "alert": {"alertname": "RareMLConceptDrift"}})
    return name


@pytest.fixture(scope="module")
def built(trained, tmp_path_factory) -> dict:
    """A copy of the trained project with one seeded retraining; make report on it (monitoring
    screenshots taken when the monitoring stack is installed)."""
    project = copy_project(trained, tmp_path_factory.mktemp("report") / "project")
    run_name = seed_retraining(project)
    monitoring = "run" if monitoring_ready() else "skip"
    proc = run_stage("07_report.py", "--artifacts", str(project / "artifacts"), "--monitoring", monitoring,
                     "--monitoring-seconds", "15", "--repo-url", REPO, "--space-repo", SPACE, cwd=project,
                     timeout=900)
    out = project / "artifacts" / "report"
    kept = Path(os.environ.get("RAREML_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "report"  # CI uploads it
    kept.mkdir(parents=True, exist_ok=True)
    for name in ("report.html", "report.pdf", "slides.html", "slides.pdf"):
        if (out / name).is_file():
            shutil.copy2(out / name, kept / name)
    return {"project": project, "out": out, "stdout": proc.stdout, "monitoring": monitoring, "run": run_name,
            "html": (out / "report.html").read_text(encoding="utf-8"),
            "slides": (out / "slides.html").read_text(encoding="utf-8")}


def images(page: str) -> list[tuple[str, str]]:
    """(src, data-source) of every <img> of a page."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r'<img[^>]*?src="([^"]+)"[^>]*?data-source="([^"]+)"', page)]


def test_every_section_heading_is_there_in_order_and_the_contents_link_to_them(built):
    page = built["html"]
    positions = []
    for i, title in enumerate(report.SECTIONS, 1):
        heading = re.search(rf'<section id="s{i}">\s*<h2>{i}\. {re.escape(title)}</h2>', page)
        assert heading, title
        assert f'<a href="#s{i}">{i}. {title}</a>' in page
        positions.append(heading.start())
    assert positions == sorted(positions)
    manifest = read_json(built["project"] / "artifacts" / "model" / "manifest.json")
    assert f'content="{manifest["model_version"]}"' in page
    assert f'{manifest["metrics"]["test"]["average_precision"]:.4f}' in page  # the test AP, from this model
    assert "Figure not available" not in page, re.findall(r"Figure not available[^<]*", page)


def test_every_figure_is_embedded_from_a_file_the_run_wrote(built):
    page, run = built["html"], built["project"] / "artifacts"
    found = images(page)
    assert len(found) == page.count("<img")  # each image says where it comes from
    sources = {source for _, source in found}
    detailed = report.main_family(read_json(run / "tuned.json"), read_json(run / "model" / "manifest.json"))
    for name, _ in report.FIGURES.values():  # every figure the run wrote is in the report
        name = name.format(family=detailed)
        if (run / name).is_file():
            assert name in sources, name
    assert {"reports/pr_roc.png", "reports/reliability.png", "reports/shap_beeswarm.png",
            f"tuning/{detailed}/optuna_history.png"} <= sources
    for src, source in found:
        assert src.startswith("data:image/png;base64,"), source  # self-contained: nothing fetched
        data = base64.b64decode(src.split(",", 1)[1])
        if source == "runs/*/gate.json":  # drawn by the report itself
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            continue
        path = run / source if not source.startswith("monitoring/") else built["out"] / source
        assert data == path.read_bytes(), source
    assert not re.search(r'<(link|script)[^>]+(href|src)="(https?:)?//', page)


def test_the_numbers_come_from_the_run(built):
    page, run = built["html"], built["project"] / "artifacts"
    prepared, tuned = read_json(run / "prepared.json"), read_json(run / "tuned.json")
    assert f'{prepared["rows"]["train"]:,}' in page and f'{prepared["rows"]["test"]:,}' in page
    assert prepared["split"] in page
    manifest = read_json(run / "model" / "manifest.json")
    weights = manifest["selection"]["weights"]
    for name in tuned["families"][max(weights, key=weights.get)]["search"]["ranges"]:
        assert f"<code>{name}</code>" in page
    assert f"<strong>{manifest['selection']['chosen']}</strong>" in page
    for name, entry in manifest["selection"]["families"].items():
        assert f"<td>{name}</td><td class=\"n\">{entry['weight']:.2f}</td>" in page
    assert f'{tuned["trials"].get("COMPLETE", 0)} trials\ncomplete' in page or \
        f'{tuned["trials"].get("COMPLETE", 0)} trials complete' in page
    for column, why in prepared["dropped"].items():
        assert f"<code>{column}</code></td><td>{why}</td>" in page
    assert f'<strong>{manifest["calibration"]["method"]}</strong>' in page
    for group in manifest["metrics"]["fairness"]["sex"]:
        assert f"<td>{group}</td>" in page


def test_the_test_tiers_are_counted_from_the_suite_and_the_ci_stages_listed(built):
    page = built["html"]
    tiers = sorted(p.parent.name for p in (ROOT / "tests").glob("*/__init__.py"))
    counts = {}
    for tier in tiers:
        row = re.search(rf'<td><code>tests/{tier}</code></td><td>[^<]+</td><td class="n">([\d,]+)</td>', page)
        assert row, tier
        counts[tier] = int(row.group(1).replace(",", ""))
    here = sum(1 for _ in (ROOT / "tests" / "report").glob("test_*.py"))
    assert counts["report"] >= here and counts["unit"] > 50, counts
    total = int(re.search(r"\(([\d,]+) tests collected", page).group(1).replace(",", ""))
    assert total == sum(counts.values())
    for stage in ("make test", ".github/workflows/ci.yml", ".ci/run"):
        assert stage in page


def test_the_links_are_there(built):
    for page in (built["html"], built["slides"]):
        assert f'<a href="{REPO}">' in page
        assert f'<a href="https://huggingface.co/spaces/{SPACE}">' in page


def test_the_retraining_timeline_shows_the_gated_run(built):
    page = built["html"]
    assert f"<td>{built['run']}</td><td>RareMLConceptDrift</td>" in page
    assert 'data-source="runs/*/gate.json"' in page


def test_the_monitoring_section_has_the_screenshots_and_every_dashboard_panel(built):
    if built["monitoring"] != "run":
        pytest.skip("Prometheus, Alertmanager or chromium missing: the report says why instead")
    page = built["html"]
    taken = read_json(built["out"] / "monitoring" / "monitoring.json")
    assert taken["model_version"] == registry.version_of(built["project"] / "artifacts", registry.CHAMPION)
    dashboard = json.loads((ROOT / "grafana_dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(taken["panels"]) == len(panels)
    for panel in taken["panels"]:
        assert f'data-source="monitoring/{panel["file"]}"' in page and str(escape(panel["title"])) in page
    assert sum(p["series"] > 0 for p in taken["panels"]) >= len(panels) - 2, taken["panels"]  # queries had data
    for shot in taken["screenshots"]:
        assert f'data-source="monitoring/{shot}"' in page
    assert "Grafana itself cannot run" in page
    assert 'data-source="monitoring/monitoring-drift.png"' in built["slides"]


def test_the_report_pdf_has_a_title_page_contents_with_page_numbers_and_no_blank_page(built, tmp_path):
    require_pdf_tools()
    pdf = built["out"] / "report.pdf"
    pages = pdf_pages(pdf)
    assert pages >= 10
    first = text_of(pdf, 1)
    assert "census-small: predicting" in first and "Test average precision" in first and REPO in first
    contents = text_of(pdf, 2)
    assert "Contents" in contents
    numbers = []
    for i, title in enumerate(report.SECTIONS, 1):
        found = re.search(rf"{i}\. {re.escape(title)}[ .]*?(\d+)\s*$", contents, re.MULTILINE)
        assert found, (title, contents)
        numbers.append(int(found.group(1)))
    assert numbers == sorted(numbers) and 3 <= numbers[0] and numbers[-1] <= pages
    assert "1. The problem" in text_of(pdf, numbers[0])  # the number points to the section's page
    assert_no_blank_page(pdf, pages, tmp_path)


def test_the_slides_are_12_to_15_with_notes_adding_up_to_12_minutes_and_the_pdf_one_page_each(built, tmp_path):
    page = built["slides"]
    slides = re.findall(r'<section class="slide[^"]*" id="slide-\d+" data-minutes="([\d.]+)">(.*?)</section>', page, re.DOTALL)
    assert 12 <= len(slides) <= 15
    assert sum(float(m) for m, _ in slides) <= 12.0 and sum(float(m) for m, _ in slides) >= 11.5
    for _, body in slides:
        notes = re.search(r'<aside class="notes">(.+?)</aside>', body, re.DOTALL)
        assert notes and len(notes.group(1).split()) >= 10, body[:200]
    for src, _ in images(page):
        assert src.startswith("data:image/png;base64,")
    require_pdf_tools()
    pdf = built["out"] / "slides.pdf"
    assert pdf_pages(pdf) == len(slides)
    size = re.search(r"Page size:\s+([\d.]+) x ([\d.]+)", subprocess.run(["pdfinfo", str(pdf)], capture_output=True,
                                                                          text=True, check=True).stdout)
    assert abs(float(size.group(1)) / float(size.group(2)) - 16 / 9) < 0.01
    assert "Model and decisions" in text_of(pdf, 5)
    assert_no_blank_page(pdf, len(slides), tmp_path)


def test_the_deck_pages_in_a_browser_and_shows_its_notes(built):
    require_chromium()
    with chromium_page(1280, 720) as page:
        page.goto((built["out"] / "slides.html").as_uri())
        visible = "Array.from(document.querySelectorAll('section.slide')).filter(s => getComputedStyle(s).display !== 'none').map(s => s.id)"
        assert page.evaluate(visible) == ["slide-1"]
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")
        assert page.evaluate(visible) == ["slide-3"]
        notes = "getComputedStyle(document.querySelector('#slide-3 aside.notes')).display"
        assert page.evaluate(notes) == "none"
        page.keyboard.press("n")
        assert page.evaluate(notes) == "block"
        page.keyboard.press("End")
        count = page.evaluate("document.querySelectorAll('section.slide').length")
        assert page.evaluate(visible) == [f"slide-{count}"]


def test_a_second_make_report_reuses_the_screenshots_of_the_same_champion(built):
    if built["monitoring"] != "run":
        pytest.skip("no screenshots were taken")
    index = built["out"] / "monitoring" / "monitoring.json"
    before = index.stat().st_mtime_ns
    proc = run_stage("07_report.py", "--artifacts", str(built["project"] / "artifacts"), "--no-pdf", "--no-tests",
                     cwd=built["project"])
    assert index.stat().st_mtime_ns == before, proc.stdout
    assert "monitoring-drift.png" in (built["out"] / "report.html").read_text()


def test_no_model_is_one_clear_error(tmp_path):
    proc = run_stage("07_report.py", "--artifacts", str(tmp_path / "nothing"), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "make all" in proc.stderr
    assert "Traceback" not in proc.stderr


def pdf_pages(pdf: Path) -> int:
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"^Pages:\s+(\d+)", info, re.MULTILINE).group(1))


def text_of(pdf: Path, page: int) -> str:
    return subprocess.run(["pdftotext", "-layout", "-f", str(page), "-l", str(page), str(pdf), "-"],
                          capture_output=True, text=True, check=True).stdout


def assert_no_blank_page(pdf: Path, pages: int, folder: Path) -> None:
    """Every page rendered to PNG by pdftoppm holds ink: more than a sliver of non-white pixels."""
    from PIL import Image

    subprocess.run(["pdftoppm", "-png", "-r", "20", str(pdf), str(folder / "page")], check=True, timeout=300)
    rendered = sorted(folder.glob("page-*.png"))
    assert len(rendered) == pages
    for png in rendered:
        pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
        assert (pixels < 200).mean() > 0.002, f"{png.name} of {pdf.name} is blank"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
