"""A screenshot of one DAG run in the Airflow UI (docs/airflow-retrain-run.png), in headless
Chromium (Debian's, driven by Playwright): logs in with the simple auth manager's form, opens the
run's page, waits for its task states, saves a PNG and returns the page's text.

  python orchestration/screenshot.py --run RUN_ID [--dag rareml_retrain] [--out docs/airflow-retrain-run.png]
  (the URL and login of `make airflow`: .airflow/admin_password)
"""
from __future__ import annotations

import argparse
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"


def shoot_run(url: str, username: str, password: str, dag_id: str, run_id: str, out: Path,
              width: int = 1500, height: int = 900) -> str:
    from playwright.sync_api import sync_playwright

    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(f"{url}/dags/{dag_id}/runs/{run_id}", wait_until="domcontentloaded")
            page.wait_for_selector("input[name=username]", timeout=30_000)  # the login form
            page.fill("input[name=username]", username)
            page.fill("input[name=password]", password)
            page.click("button[type=submit]")
            page.wait_for_url(f"**/dags/{dag_id}/runs/{run_id}**", timeout=30_000)
            page.wait_for_selector(f"text={run_id}", timeout=30_000)
            page.wait_for_timeout(3000)  # the grid and the task states draw after their queries return
            page.screenshot(path=str(out))
            return page.inner_text("body")
        finally:
            browser.close()


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import airflow_stack

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=f"http://127.0.0.1:{airflow_stack.PORT}")
    parser.add_argument("--dag", default="rareml_retrain")
    parser.add_argument("--run", required=True, help="the DAG run id")
    parser.add_argument("--out", type=Path, default=Path("docs/airflow-retrain-run.png"))
    args = parser.parse_args()
    password = (airflow_stack.HOME / "admin_password").read_text().strip()
    shoot_run(args.url, airflow_stack.USER, password, args.dag, args.run, args.out)
    print(f"screenshot: {args.out}")


if __name__ == "__main__":
    main()
