"""Every number a tool takes on its command line is bounded (issue 24, class 1): the class test.

Not a list of flags: each tool of ``megatron_ext.cli`` is found by listing the package, its real
parser is taken from its real ``main`` (stopped where it parses), and every option whose type
turns "7" into a number (or a list of numbers) gets every value of ``ABSURD``: NaN, infinities,
past-int64 and 5000-digit integers, hex, empty, 100,000 characters. Each must be refused by the
tool itself with one line naming the flag, of bounded length, exit 2, nothing on stdout. A flag
typed with bare ``int``/``float`` (unbounded) or a number flag without a type fails the test,
so a new flag is covered the day it is added. The config-field flags' exact messages are in
test_config_bounded.py."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable

import pytest

import megatron_ext.cli
from tests.conftest import run_cli

MAX_LINE = 300
ABSURD = ["nan", "NaN", "inf", "-inf", "1e400", "-1e400", str(2**70), f"-{2**70}", "9" * 5000,
          "0x10", "", "x" * 100_000]
NOT_INTEGER = ["2.5", "1e3"]  # refused by integer flags only
TOOLS = sorted(m.name for m in pkgutil.iter_modules(megatron_ext.cli.__path__))


class _Parsed(BaseException):  # not an Exception: no tool's error handling catches it
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def _entry(tool: str) -> Callable[[list[str]], object]:
    """What parses the tool's arguments: its ``main``, except training's, whose ``main``
    installs process-wide signal handlers first: its ``parse_args`` (what that ``main`` calls
    first; the one-line exit 2 of a real process is checked below)."""
    if tool == "pretrain":
        from megatron_ext.training.cli import parse_args

        return parse_args
    return importlib.import_module(f"megatron_ext.cli.{tool}").main


def parser_of(tool: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    def stop(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Parsed(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_known_args", stop)
        try:
            _entry(tool)([])
        except _Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"{tool}: main returned without parsing its arguments")


def _number_kind(action: argparse.Action) -> str | None:
    """'int' / 'float' when the option takes numbers (alone or in a list), else None."""
    if action.type is None or not action.option_strings or action.nargs == 0:
        return None
    try:
        value = action.type("7")
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return None
    items = list(value) if isinstance(value, (frozenset, set, list, tuple)) else [value]
    if not items or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                            for x in items):
        return None
    try:  # a size flag (2GB, 1.5GiB) takes fractions of its units
        action.type("2.5")
        return "float"
    except (argparse.ArgumentTypeError, ValueError):
        return "int"


def number_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{flag: 'int' | 'float'} of every number option; fails on an unbounded one."""
    out = {}
    for action in parser._actions:
        flag = max(action.option_strings, key=len, default=action.dest)
        assert action.type not in (int, float), \
            f"{flag}: type={action.type.__name__} is unbounded; use config.args " \
            "(field_arg, int_arg, float_arg, size_arg)"
        default = action.default
        if action.type is None and action.option_strings and action.nargs != 0 and \
                isinstance(default, (int, float)) and not isinstance(default, bool):
            raise AssertionError(f"{flag}: a number (default {default}) taken without a type")
        kind = _number_kind(action)
        if kind:
            out[flag] = kind
    return out


def refuse(tool: str, argv: list[str], flag: str, capsys: pytest.CaptureFixture) -> None:
    """The tool refuses ``argv`` with one bounded line naming ``flag`` and exit 2."""
    if tool == "pretrain":  # training.cli.main prints "error: <UsageError>" and returns 2
        from megatron_ext.errors import UsageError

        with pytest.raises(UsageError) as e:
            _entry(tool)(argv)
        code, lines, out = 2, [f"error: {e.value}"], ""
    else:
        code = _entry(tool)(argv)
        captured = capsys.readouterr()
        lines = [x for x in captured.err.splitlines() if x.strip()]
        out = captured.out
    shown = f"{argv[0][:80]}: {code} {lines[:3]}"
    assert code == 2 and len(lines) == 1 and out == "", shown
    assert lines[0].startswith(f"error: argument {flag}") or f" {flag}" in lines[0], shown
    assert len(lines[0]) < MAX_LINE, shown


@pytest.mark.parametrize("tool", TOOLS)
def test_every_number_flag_refuses_absurd_values(tool: str, monkeypatch, capsys) -> None:
    flags = number_flags(parser_of(tool, monkeypatch))
    for flag, kind in flags.items():
        for value in ABSURD + (NOT_INTEGER if kind == "int" else []):
            refuse(tool, [f"{flag}={value}"], flag, capsys)


def test_the_tools_and_their_number_flags_are_found(monkeypatch) -> None:
    """The introspection sees what it should (a tool with number flags, a list flag)."""
    assert {"upcycle", "generate", "pretrain", "preprocess", "parity"} <= set(TOOLS)
    flags = {tool: number_flags(parser_of(tool, monkeypatch)) for tool in TOOLS}
    assert flags["upcycle"]["--moe-layers"] == "int" and flags["upcycle"]["--seed"] == "int"
    assert flags["upcycle"]["--max-shard-size"] == "float"
    assert flags["pretrain"] == {"--nodes": "int"} and flags["parity"]["--steps"] == "int"
    assert sum(map(len, flags.values())) >= 30


def test_training_flag_in_a_real_process() -> None:
    proc = run_cli(["pretrain_moe.py", "--plan", f"--nodes={2**70}"], timeout=240)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "argument --nodes: must be <= 65536" in lines[0], lines[0]
