"""The Hugging Face Space folder (`make space`): app.py as it is, the rareml modules it imports,
the model folder and report figures, a requirements.txt pinned to the project's versions (with
xgboost-cpu, not the CUDA-carrying xgboost), and a README.md with the Space's front matter.
`make publish-space SPACE_REPO=user/name` uploads it with huggingface_hub, token from HF_TOKEN.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

from rareml import registry
from rareml.cli import run
from rareml.errors import RareMLError
from rareml.model import members_of, verify_model_dir

ROOT = Path(__file__).resolve().parent.parent
# What app.py imports, and what those import: no MLflow, Optuna, Flask or scikit-learn in the Space.
MODULES = ("__init__", "errors", "config", "features", "metrics", "calibration", "predictor", "model", "registry",
           "scoring", "artifacts")
PACKAGES = ("gradio", "xgboost-cpu", "numpy", "pandas", "matplotlib")


def pinned(packages: tuple[str, ...] = PACKAGES, requirements: Path = ROOT / "requirements.txt") -> list[str]:
    """The project's pins for these packages (one version everywhere)."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", requirements.read_text(), re.MULTILINE))
    missing = [p for p in packages if p not in pins]
    if missing:
        raise RareMLError(f"{requirements} pins no version of {', '.join(missing)}")
    return [f"{p}=={pins[p]}" for p in packages]


def front_matter(manifest: dict, gradio_version: str) -> str:
    test = manifest["metrics"]["test"]
    return f"""---
title: rareml {manifest['name']}
emoji: 🎯
colorFrom: indigo
colorTo: red
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
---

# {manifest['name']}: a calibrated rare-event classifier

Built by [rareml](https://github.com/) from a table and a TOML config: XGBoost tuned by Optuna,
calibrated ({manifest['calibration']['method']}), threshold chosen for {manifest['threshold']['metric']}.
Model version {manifest['model_version']}, trained {manifest['trained_at']}: test average precision
{test['average_precision']:.4f}, ROC-AUC {test['roc_auc']:.4f}, Brier {test['brier']:.4f}.

The "Load a real example" button uses {manifest['name']} test records shipped in
`artifacts/model/examples.json`.
"""


def build_space(artifacts: Path, out: Path) -> Path:
    """Write the Space folder `out` (replacing it) from the model in ARTIFACTS."""
    champion = registry.serving_dir(artifacts)
    manifest = verify_model_dir(champion)
    if out.resolve() in (ROOT.resolve(), artifacts.resolve()):
        raise RareMLError(f"refusing to replace {out}: choose an empty or Space folder")
    shutil.rmtree(out, ignore_errors=True)
    (out / "rareml").mkdir(parents=True)
    shutil.copy2(ROOT / "app.py", out / "app.py")
    for module in MODULES:
        shutil.copy2(ROOT / "rareml" / f"{module}.py", out / "rareml" / f"{module}.py")
    (out / "rareml" / "families").mkdir()  # the families interface, and the modules of the model's members only
    for name in ["__init__", *(m["family"] for m in members_of(manifest))]:
        shutil.copy2(ROOT / "rareml" / "families" / f"{name}.py", out / "rareml" / "families" / f"{name}.py")
    shutil.copytree(champion, out / "artifacts" / "model")
    (out / "artifacts" / "reports").mkdir()
    for figure in (artifacts / "reports").glob("*.png"):
        shutil.copy2(figure, out / "artifacts" / "reports" / figure.name)
    requirements = pinned()
    (out / "requirements.txt").write_text("\n".join(requirements) + "\n")
    gradio = next(r.split("==")[1] for r in requirements if r.startswith("gradio=="))
    (out / "README.md").write_text(front_matter(manifest, gradio))
    return out


def publish(folder: Path, repo: str) -> str:
    """Upload the Space folder to Hugging Face (token from HF_TOKEN; the Space is created if new)."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise RareMLError("HF_TOKEN is not set: create a write token at https://huggingface.co/settings/tokens")
    if not (folder / "app.py").is_file():
        raise RareMLError(f"{folder} is not a Space folder: run `make space` first")
    from huggingface_hub import HfApi

    os.environ.pop("HF_HUB_OFFLINE", None)
    api = HfApi(token=token)
    api.create_repo(repo, repo_type="space", space_sdk="gradio", exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="space",
                      commit_message="rareml: publish the model and the app")
    return f"https://huggingface.co/spaces/{repo}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--out", type=Path, default=Path("space"))
    parser.add_argument("--publish", metavar="USER/NAME", help="upload --out to this Space instead of building it")
    args = parser.parse_args(argv)
    if args.publish:
        print(f"published: {publish(args.out, args.publish)}")
        return
    out = build_space(args.artifacts, args.out)
    print(f"Space folder: {out} (run it: cd {out} && python app.py)")


if __name__ == "__main__":
    run(main)
