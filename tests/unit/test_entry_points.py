"""The command-line entry points: every tool of ``megatron_ext/cli/`` is a console script of
pyproject.toml, runs as ``python -m megatron_ext.cli.<tool>``, and answers under its old
``tools/`` path. Usage errors only: each run stops before any heavy import."""

from __future__ import annotations

import json
import subprocess
import tomllib
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import REPO, run_cli

CLI = REPO / "megatron_ext" / "cli"
MODULES = sorted(p.stem for p in CLI.glob("*.py") if p.stem != "__init__")
OLD_PATHS = {  # the scripts that existing commands and docs name
    "tools/convert/upcycle.py": "upcycle", "tools/convert/hf_to_mcore.py": "hf_to_mcore",
    "tools/convert/mcore_to_hf.py": "mcore_to_hf", "tools/data/preprocess.py": "preprocess",
    "tools/data/train_tokenizer.py": "train_tokenizer", "tools/analysis/routing.py": "routing",
    "tools/analysis/loss_curves.py": "loss_curves", "tools/eval/lm_eval.py": "lm_eval",
    "tools/generate.py": "generate", "tools/experiments/compare_inits.py": "compare_inits",
    "tools/parity/mixtral_parity.py": "parity", "pretrain_moe.py": "pretrain",
}
BAD_FLAG = "--no-such-flag"


def _scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_tool_is_a_console_script_named_after_its_module() -> None:
    assert len(MODULES) >= 11
    assert _scripts() == {f"moe-{m.replace('_', '-')}": f"megatron_ext.cli.{m}:main"
                          for m in MODULES}


def test_every_script_target_is_a_main_that_returns_an_int() -> None:
    """What a console script does, ``sys.exit(main())``, for each target, in one process: a
    usage error must come back as exit code 2 (one line), not raise."""
    probe = (
        "import importlib, json, sys\n"
        "codes = {}\n"
        "for name, target in json.loads(sys.argv[1]).items():\n"
        "    module, func = target.split(':')\n"
        f"    code = getattr(importlib.import_module(module), func)([{BAD_FLAG!r}])\n"
        "    codes[name] = [type(code).__name__, code]\n"
        "print(json.dumps(codes))\n")
    proc = run_cli(["-c", probe, json.dumps(_scripts())], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert codes == {name: ["int", 2] for name in _scripts()}
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == len(codes), proc.stderr  # one line per tool
    assert all(_is_usage_error(line) for line in errors), errors


def _is_usage_error(line: str) -> bool:
    """The one line of ``platform.cli.ArgumentParser`` (a missing required flag or ours)."""
    return line.startswith("error: ") and line.endswith("(see --help)")


def _usage_error(argv: list[str]) -> subprocess.CompletedProcess:
    return run_cli([*argv, BAD_FLAG], timeout=300)


def test_python_m_and_the_old_paths_run_each_tool() -> None:
    commands = {f"-m megatron_ext.cli.{m}": ["-m", f"megatron_ext.cli.{m}"] for m in MODULES}
    commands.update({path: [path] for path in OLD_PATHS})
    # tools newer than the tools/ layout (recipe) have no old path: only -m and a console script
    assert set(OLD_PATHS.values()) == set(MODULES) - {"recipe"}
    with ThreadPoolExecutor(4) as pool:  # each waits on its own interpreter
        results = dict(zip(commands, pool.map(_usage_error, commands.values()), strict=True))
    for what, proc in results.items():
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and _is_usage_error(lines[0]), (
            what, proc.stderr)
