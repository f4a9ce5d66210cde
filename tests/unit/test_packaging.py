"""What is shipped beside the code: the image's requirements agree with the project's pins, the
Docker context holds what the Dockerfile copies, and the Space's requirements come from the pins."""
from __future__ import annotations

import re

from rareml.space import PACKAGES, pinned
from tests.conftest import ROOT


def pins(path) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", path.read_text(), re.MULTILINE))


def test_image_requirements_use_the_project_pins():
    image, project = pins(ROOT / "requirements-serve.txt"), pins(ROOT / "requirements.txt")
    assert image and all(project.get(name) == version for name, version in image.items()), (image, project)
    assert "xgboost" not in image and "xgboost-cpu" in image


def test_dockerfile_copies_only_what_dockerignore_lets_in():
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.MULTILINE)
    allowed = [line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    assert copied and all(any(c.rstrip("/") in a for a in allowed) for c in copied), (copied, allowed)
    assert "USER 10001" in dockerfile and "HEALTHCHECK" in dockerfile and "ARG BASE_IMAGE=" in dockerfile


def test_space_requirements_are_the_project_pins():
    project = pins(ROOT / "requirements.txt")
    assert pinned() == [f"{p}=={project[p]}" for p in PACKAGES]
