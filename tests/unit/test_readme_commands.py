"""Every command the README prints, checked against the tools, so the README cannot drift.

What is checked, for every logical line of every ```bash block (continuations joined, comments
dropped, ``VAR=value`` prefixes read):

- parsed, every line: a ``moe-*`` console script must exist in pyproject's [project.scripts]
  and its own argparse parser must accept the line's exact flags (one child process parses all
  lines: ``parse_args`` is stopped right after parsing, so nothing runs); ``pretrain_moe.py``,
  ``torchrun ... pretrain_moe.py`` and ``sbatch ... scripts/slurm/X.sh ARGS`` (the script must
  exist; its ARGS go to training) are parsed by training's parser, and every ``--set`` must name
  a config field with a value of the right type (loaded over the line's ``--config`` when that
  file exists); torchrun's options by torch's own parser; ``make`` targets must exist in the
  Makefile; ``python FILE`` must name a file; a command that is none of these nor in
  ``EXTERNAL`` (mkdir, docker, enroot, ...: not ours to check) fails the test.
- executed, as printed, through bash with the venv's bin first on PATH: the lines in ``RUN``
  (each takes about a second: --print-config, --plan). Nothing else runs here: training,
  conversion, routing, lm-eval and SLURM lines are covered by their own tests; this file only
  keeps their names and flags true. SLURM and GPU lines are parsed only.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
# Commands that are not this project's; only their presence in the list is checked.
EXTERNAL = {"mkdir", "source", "docker", "enroot", "scancel", "scontrol", "wandb", "cd", "export",
            "tail", "ls", "cat", "pip"}
# README lines executed for real, as printed (seconds each). A line removed from the README
# fails the test until it is taken out of here too.
RUN = [
    "moe-pretrain --config configs/8x152M.yaml --print-config",
    "moe-pretrain --config configs/8x1.5B.yaml --plan --nodes 8",
]


def bash_lines(text: str) -> list[str]:
    """The logical command lines of the ```bash blocks: continuations joined, blank and
    comment-only lines dropped."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        pending = ""
        for raw in block.splitlines():
            pending += raw.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            if shlex.split(pending, comments=True):
                lines.append(" ".join(pending.split()))
            pending = ""
    return lines


def code(line: str) -> str:
    """A line without its comment (words re-quoted as needed)."""
    return shlex.join(shlex.split(line, comments=True))


def printed(command: str) -> str:
    """The README line, comment included, whose code is ``command``."""
    return next(line for line in bash_lines(README.read_text()) if code(line) == command)


def _scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _without_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def _script_arg(words: list[str], suffix: str) -> int:
    """Index of the first word ending in ``suffix`` (torchrun's script, sbatch's script)."""
    return next(i for i, w in enumerate(words) if w.endswith(suffix))


def classify(line: str) -> list[tuple[str, str, list[str]]]:
    """The checks a line needs: (kind, what, args) with kind module (parse ``args`` with the
    console script module ``what``), train (training's parser, ``what`` = config fallback),
    torchrun, make, file; a problem found here is an AssertionError naming the line."""
    env, words = _without_env(shlex.split(line, comments=True))
    command, args = words[0], words[1:]
    scripts = _scripts()
    if command.startswith("moe-"):
        assert command in scripts, f"{line!r}: no console script {command} in pyproject.toml"
        module = scripts[command].split(":")[0]
        if module == "megatron_ext.cli.pretrain":
            return [("train", "", args)]
        return [("module", module, args)]
    if command in ("python", "python3"):
        if args[:1] == ["-m"]:
            return [("module", args[1], args[2:])]
        assert (REPO / args[0]).is_file(), f"{line!r}: no file {args[0]}"
        if args[0] == "pretrain_moe.py":
            return [("train", "", args[1:])]
        return [("file", args[0], [])]
    if command == "torchrun":
        at = _script_arg(args, ".py")
        assert args[at] == "pretrain_moe.py", f"{line!r}: torchrun runs {args[at]}"
        return [("torchrun", "", args[:at + 1]), ("train", "", args[at + 1:])]
    if command == "sbatch":
        at = _script_arg(args, ".sh")
        assert (REPO / args[at]).is_file(), f"{line!r}: no script {args[at]}"
        return [("train", env.get("MOE_CONFIG", ""), args[at + 1:])]
    if command == "make":
        makefile = (REPO / "Makefile").read_text()
        for target in args:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.MULTILINE), \
                f"{line!r}: no make target {target}"
        return []
    assert command in EXTERNAL, f"{line!r}: {command} is neither a tool of ours nor in EXTERNAL"
    return []


# The child process: parses each (kind, module, args) and prints one JSON verdict per check.
PARSER = r"""
import argparse, contextlib, importlib, io, json, sys
from pathlib import Path

from megatron_ext.config.loader import load_config
from megatron_ext.training import cli as training, wandb_sink


class Parsed(BaseException):  # not an Exception: no tool's error handling catches it
    pass


original = argparse.ArgumentParser.parse_args


def stop_after_parsing(self, args=None, namespace=None):
    original(self, args, namespace)  # a bad flag raises here (UsageError or SystemExit)
    raise Parsed()


def check(kind, what, args):
    if kind == "train":
        ns = training.parse_args(args)
        config = ns.config if ns.config and Path(ns.config).is_file() else (what or None)
        load_config(config, [*wandb_sink.env_overrides({}), *ns.overrides])
        return
    if kind == "torchrun":
        from torch.distributed import run
        run.parse_args(args)
        return
    if kind == "file":
        return
    module = importlib.import_module(what)
    argparse.ArgumentParser.parse_args = stop_after_parsing
    said = io.StringIO()  # the tool's own one-line error, e.g. "unrecognized arguments: ..."
    try:
        with contextlib.redirect_stderr(said):
            code = module.main(args)
    except Parsed:
        return
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{what} exit {code}: {said.getvalue().strip()}")


for kind, what, args in json.loads(sys.stdin.read()):
    try:
        check(kind, what, args)
        verdict = None
    except SystemExit as e:
        verdict = f"argparse exit {e.code}"
    except BaseException as e:
        verdict = f"{type(e).__name__}: {e}"
    print(json.dumps(verdict), flush=True)
"""


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for name in wandb_vars():
        env.pop(name, None)  # the README's lines are checked against the files alone
    return env


def wandb_vars() -> list[str]:
    return ["WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_DIR"]


def test_readme_has_command_blocks() -> None:
    lines = [code(line) for line in bash_lines(README.read_text())]
    assert len(lines) > 20, lines
    # the lines run here are README lines, word for word
    assert set(RUN) <= set(lines), set(RUN) - set(lines)


def test_every_readme_command_names_real_tools_and_flags() -> None:
    lines = bash_lines(README.read_text())
    checks = [(line, c) for line in lines for c in classify(line)]
    kinds = {c[0] for _, c in checks}
    assert {"module", "train", "torchrun"} <= kinds, kinds
    proc = subprocess.run([sys.executable, "-c", PARSER], cwd=REPO, env=_env(), text=True,
                          capture_output=True, timeout=300,
                          input=json.dumps([list(c) for _, c in checks]))
    verdicts = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(verdicts) == len(checks), proc.stderr[-3000:]
    bad = [f"{line!r}: {verdict}" for (line, _), verdict in zip(checks, verdicts, strict=True)
           if verdict is not None]
    assert not bad, "\n".join(bad)


def test_a_wrong_tool_or_flag_is_caught() -> None:
    """The checks above bite: a renamed tool, an unknown flag, a wrong --set key."""
    with pytest.raises(AssertionError, match="no console script"):
        classify("moe-convert --input a --output b")
    with pytest.raises(AssertionError, match="neither a tool of ours"):
        classify("python3.11 pretrain_moe.py")
    checks = [c for line in ("moe-routing --checkpoint c --text a=b --output o --colour",
                             "moe-pretrain --config configs/tiny-cpu.yaml --set train.stepz=1",
                             "moe-generate --checkpoint c --prompt hi")
              for c in classify(line)]
    proc = subprocess.run([sys.executable, "-c", PARSER], cwd=REPO, env=_env(), text=True,
                          capture_output=True, timeout=300, input=json.dumps(checks))
    verdicts = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(verdicts) == 3, proc.stderr[-3000:]
    assert verdicts[2] is None, verdicts
    assert "--colour" in verdicts[0] and "stepz" in verdicts[1], verdicts


@pytest.mark.parametrize("line", RUN)
def test_readme_line_runs_as_printed(line: str) -> None:
    proc = subprocess.run(["bash", "-c", printed(line)], cwd=REPO, env=_env(), text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
