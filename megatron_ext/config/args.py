"""Command-line numbers checked as config values are: argparse ``type=`` functions.

A tool's flag that sets a config field takes the field's type and declared bounds::

    p.add_argument("--num-experts", type=field_arg("moe.num_experts"))

and any other number or size flag declares its own bounds the same way (``int_arg(1, 1024)``,
``float_arg(0, 1, lo_open=True)``, ``int_list_arg(0, 1023, 1024)``, ``size_arg``). A bad value
is argparse's usage error (one line, exit 2 from ``platform.cli.run_cli``), said with the flag,
the bound and the value cut short: ``argument --seed: must be <= 4294967295 (upcycling.seed),
got 1.181e+21``. Parsing never formats or converts more of the argument than a message shows.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from functools import cache

from megatron_ext.config.fields import Range, arms, leaves, short_repr
from megatron_ext.config.loader import ConfigError
from megatron_ext.config.schema import Config

MAX_SIZE = 2**50  # 1 PiB: no file or shard of ours is larger; far inside int64
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"([0-9]*\.?[0-9]+(?:E[+-]?[0-9]+)?)\s*([KMGT]I?B|B)?")
_INT = re.compile(r"[+-]?[0-9]{1,30}")  # past 30 digits it is beyond every bound anyway


def _parse(text: str, integer: bool, name: str) -> int | float:
    """``text`` as an int (decimal digits only) or a float (what ``float`` reads, inf and nan
    included: the bound refuses them with their name); ArgumentTypeError if it is neither."""
    s = text.strip()
    if integer:
        if _INT.fullmatch(s):
            return int(s)
        if re.fullmatch(r"[+-]?[0-9]+", s):  # too many digits to be within any bound
            sign = "-" if s.startswith("-") else ""
            raise argparse.ArgumentTypeError(f"{sign}an integer of {len(s.lstrip('+-'))} "
                                             f"digits is out of range{name}")
        raise argparse.ArgumentTypeError(f"expected an integer, got {short_repr(text)}")
    try:
        if len(s) > 100:  # no number of ours needs more characters
            raise ValueError
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {short_repr(text)}"
                                         ) from None


def _checked(text: str, rng: Range, integer: bool, field: str = "") -> int | float:
    name = f" ({field})" if field else ""
    value = _parse(text, integer, name)
    why = rng.problem(value)
    if why:
        raise argparse.ArgumentTypeError(why.replace(", got", f"{name}, got", 1))
    return value


def int_arg(lo: int, hi: int) -> Callable[[str], int]:
    """argparse ``type=``: an integer in [lo, hi]."""
    rng = Range(lo, hi)

    def parse(text: str) -> int:
        return int(_checked(text, rng, integer=True))

    parse.__name__ = "integer"
    return parse


def int_list_arg(lo: int, hi: int, max_items: int) -> Callable[[str], list[int]]:
    """argparse ``type=``: comma-separated integers (``0,2,4``), 1 to ``max_items`` of them,
    each in [lo, hi]."""
    item = int_arg(lo, hi)

    def parse(text: str) -> list[int]:
        items = text.split(",", max_items)
        if len(items) > max_items or not any(x.strip() for x in items):
            raise argparse.ArgumentTypeError(f"expected 1 to {max_items} comma-separated "
                                             f"integers, e.g. 0,2,4, got {short_repr(text)}")
        return [item(x) for x in items if x.strip()]

    parse.__name__ = "integer list"
    return parse


def float_arg(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False
              ) -> Callable[[str], float]:
    """argparse ``type=``: a finite number in the interval (closed unless ``*_open``)."""
    rng = Range(lo, hi, lo_open=lo_open, hi_open=hi_open)

    def parse(text: str) -> float:
        return float(_checked(text, rng, integer=False))

    parse.__name__ = "number"
    return parse


@cache
def _field(dotted: str) -> tuple[Range, bool]:
    """The declared Range of config field ``dotted`` and whether it takes only integers."""
    leaf = next((x for x in leaves(Config) if x.name == dotted), None)
    rng = next((r for r in leaf.field.metadata.get("bounds", ()) if isinstance(r, Range)),
               None) if leaf else None
    if rng is None:
        raise ValueError(f"{dotted} is not a config field with a numeric range")
    kinds = arms(leaf.annotation)
    return rng, int in kinds and float not in kinds


def field_arg(dotted: str) -> Callable[[str], int | float]:
    """argparse ``type=`` for a flag that sets (or means the same as) config field ``dotted``:
    parsed as the field's type, within the bounds the schema declares for it."""
    rng, integer = _field(dotted)  # a wrong name fails when the parser is built, not used

    def parse(text: str) -> int | float:
        value = _checked(text, rng, integer, dotted)
        return int(value) if integer else float(value)

    parse.__name__ = dotted
    return parse


def parse_size(text: str | int) -> int:
    """'2GB' / '500MB' / '1.5GiB' / '123' -> bytes (decimal units like HF, binary with 'i'), a
    whole number of bytes in [1, MAX_SIZE]; an int is taken as bytes. ConfigError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value: float = text
    else:
        m = _SIZE.fullmatch(str(text)[:100].strip().upper())
        if m is None or len(str(text)) > 100:
            raise ConfigError(f"bad size {short_repr(text)} (use e.g. 2GB, 500MB, 1.5GiB)")
        value = float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""]
    if not (math.isfinite(value) and 1 <= value <= MAX_SIZE):
        raise ConfigError(f"size {short_repr(text)} must be from 1 byte to 1 PiB")
    return int(value)


def size_arg(text: str) -> int:
    """argparse ``type=``: a size in bytes (see ``parse_size``)."""
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
