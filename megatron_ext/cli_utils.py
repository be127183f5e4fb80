"""The command-line convention shared by the conversion tools: bad usage is one line, exit 2."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """Raised by OneLineParser instead of printing usage + message and exiting."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors become ``UsageError`` so the tool prints a single line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)
