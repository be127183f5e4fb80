"""Every module of megatron_ext imports first, in a fresh interpreter: no import cycle at run time.

A cycle can hide behind import order: ``trainer -> callbacks -> checkpointing -> trainer`` works
while something imports ``callbacks`` first, and raises ImportError when ``trainer`` comes first.
So each module is imported on its own with no module of the package loaded before it. One
subprocess does all of them: before each import it drops every entry of the package from
``sys.modules``, while third-party modules (torch, megatron-core, lm-eval) stay loaded, which
keeps the whole check to seconds instead of one interpreter start per module. A module that
fails there is tried again in an interpreter of its own, and only that verdict counts: a
re-import can trip on state a library kept from the previous one (lm-eval's model registry
refuses a second registration of our model class).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# argv: the directory that holds the package, the package name. Prints a JSON list of failures.
CHECKER = r"""
import importlib, json, sys, traceback
from pathlib import Path

parent, package = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, str(parent))
names = []
for path in sorted((parent / package).rglob("*.py")):
    parts = path.relative_to(parent).with_suffix("").parts
    names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
failures = {}
for name in names:
    for key in [k for k in sys.modules if k == package or k.startswith(package + ".")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except Exception as e:  # the module's own failure, whatever it is
        where = traceback.extract_tb(e.__traceback__)[-1]
        failures[name] = f"{name}: {type(e).__name__}: {e} ({where.filename}:{where.lineno})"
print(json.dumps({"modules": len(names), "failures": failures}))
"""


def _python(parent: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                          cwd=parent)


def check(parent: Path, package: str) -> dict:
    """{"modules": how many, "failures": the modules that fail to import first, one line each}"""
    proc = _python(parent, "-c", CHECKER, str(parent), package)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    confirmed = [line for name, line in result["failures"].items()
                 if _python(parent, "-c", f"import {name}").returncode != 0]
    return {"modules": result["modules"], "failures": confirmed}


def test_every_module_imports_first_in_a_fresh_interpreter():
    result = check(REPO, "megatron_ext")
    assert result["modules"] > 100  # the walk found the package, not an empty directory
    assert result["failures"] == []


def test_the_check_finds_a_cycle_that_import_order_hides(tmp_path):
    """The shape of the cycle this test was written for: ``cbs`` first imports fine, ``trainer``
    first does not. Importing everything in one interpreter, sorted, would pass."""
    files = {
        "pkg/__init__.py": "",
        "pkg/cbs/__init__.py": "from pkg.cbs.base import Base\nfrom pkg.cbs.impl import Impl\n",
        "pkg/cbs/base.py": "class Base:\n    pass\n",
        "pkg/cbs/impl.py": "from pkg.trainer import Trainer\n\n\nclass Impl:\n    pass\n",
        "pkg/trainer.py": "from pkg.cbs.base import Base\n\n\nclass Trainer:\n    pass\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    result = check(tmp_path, "pkg")
    assert result["modules"] == 5
    assert [f.split(":")[0] for f in result["failures"]] == ["pkg.trainer"]
    assert "ImportError" in result["failures"][0]
