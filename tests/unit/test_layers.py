"""Imports run one way: errors -> config -> platform -> data -> model -> checkpoint ->
{upcycling | training | analysis}.

Guarantees shown: the real ``lint-imports`` passes on the tree with the contract in
pyproject.toml; and the same contract machinery fails, naming the import, when the tree holds an
import against a contract's arrow (the contract's layers reordered in a temporary config file,
so that imports which exist today become back-imports; no source file is edited).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def layers_contract() -> dict:
    """The package-wide contract (the others hold inside one package, through `containers`)."""
    (contract,) = [c for c in contracts() if c["type"] == "layers" and "containers" not in c]
    return contract


def test_the_tree_keeps_the_layer_contract():
    proc = lint_imports()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"{len(contracts())} kept, 0 broken" in proc.stdout
    # the contract covers every package of the library, so no layer escapes it
    layers = {name.strip() for entry in layers_contract()["layers"] for name in entry.split("|")}
    packages = {f"megatron_ext.{p.name}" for p in (REPO / "megatron_ext").iterdir()
                if (p / "__init__.py").exists()} | {"megatron_ext.errors"}
    assert packages <= layers, f"packages outside the layer contract: {packages - layers}"


@pytest.mark.parametrize("lower, upper, example", [
    ("megatron_ext.model", "megatron_ext.checkpoint", "megatron_ext.checkpoint.load_model -> "
                                                      "megatron_ext.model.builder"),
    ("megatron_ext.config", "megatron_ext.platform", "megatron_ext.platform.dist -> "
                                                     "megatron_ext.config.schema"),
    ("megatron_ext.errors", "megatron_ext.config", "megatron_ext.config.loader -> "
                                                   "megatron_ext.errors"),
])
def test_a_back_import_breaks_the_contract(tmp_path, lower, upper, example):
    """Swap two layers: imports that are legal today become back-imports and must be named."""
    contract = layers_contract()
    layers = list(contract["layers"])
    i, j = layers.index(lower), layers.index(upper)
    layers[i], layers[j] = layers[j], layers[i]
    config = tmp_path / "swapped.toml"
    config.write_text("\n".join([
        "[tool.importlinter]", 'root_package = "megatron_ext"', "",
        "[[tool.importlinter.contracts]]", 'name = "swapped layers"', 'type = "layers"',
        "layers = [" + ", ".join(f'"{entry}"' for entry in layers) + "]", ""]))
    proc = lint_imports(str(config))
    assert proc.returncode != 0
    assert "0 kept, 1 broken" in proc.stdout
    assert f"{upper} is not allowed to import {lower}" in proc.stdout
    assert example in " ".join(proc.stdout.split())
