"""What the schema declares with each field besides its type: its bounds and its resume policy.

A field of ``schema.py`` is declared once, with everything that is checked about it::

    hidden_size: int = setting(64, bounds=Range(1, 65536), resume=ARCH)
    \"\"\"Model width.\"\"\"

``bounds``: a ``Range`` for numbers, ``Items`` for what a list may hold (both for a field that
takes either), ``Entries`` for a mapping of names; every ``int``/``float``/``list``/``dict``
field has them (a test walks the schema).
``resume``: what a rerun on an existing checkpoint does when the field changed (``ARCH``,
``RUN``, ``FREE``; see ``checkpoint/resume_check.py``); a field without one takes its
section's, declared where ``Config`` holds the section (``section(ModelConfig, resume=RUN)``).
A ``bool``/``str``/``Literal`` field needs neither and stays a plain ``name: type = default``.

Also here, because every message about a value needs them: ``short_repr`` (a value quoted in
bounded length and time, whatever its size) and ``clip`` (the same for a name or a text).
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Union

INT32_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1  # numpy's RandomState and torch.manual_seed take 32-bit seeds
# Steps stay exact in float64, which the LR schedule uses for step / decay_steps.
STEPS_MAX = 2**53
LR_MAX = 10.0
# A string field holds a path, a name or a short spec: longer than a path may be is not one.
MAX_STRING = 4096

# Resume policies (checkpoint/resume_check.py applies them).
ARCH = "arch"  # the checkpoint's tensors cannot be loaded into the configured model: refused
RUN = "run"  # loads, but continuing becomes another run: refused unless allow_config_change
FREE = "free"  # how the run is observed, saved, laid out or computed, not what it computes
POLICIES = (ARCH, RUN, FREE)

_SHORT = 40


def _repr_limits() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 3, _SHORT, _SHORT
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 4
    return r


_REPR = _repr_limits()


def short_repr(value: Any) -> str:
    """``repr`` cut to one short line, in time bounded whatever ``value`` is (a shared, aliased
    or huge structure; an integer of a million digits): a message quotes a value, never all
    of it."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return _num(value)
    if isinstance(value, str) and len(value) > _SHORT:
        return f"{value[:20]!r}...({len(value)} characters)"
    try:
        text = _REPR.repr(value)
    except ValueError:  # an integer past Python's digit limit, deep inside a container
        text = f"<{type(value).__name__}>"
    return clip(text)


def clip(text: str, limit: int = 60) -> str:
    """``text`` (a key, a name, a flag's argument) on one line and at most about ``limit``
    characters, its length said when cut."""
    head = " ".join(text[:limit].split())
    return head if len(text) <= limit else f"{head[:limit - 20]}...({len(text)} characters)"


def _num(x: float) -> str:
    if isinstance(x, int) and x.bit_length() > 63:  # past int64: mantissa and exponent
        sign = "-" if x < 0 else ""
        if x.bit_length() > 10000:  # str() of it is slow, then refused (Python's digit limit)
            return f"{sign}an integer of {x.bit_length()} bits"
        text = str(abs(x))
        return f"{sign}{text[0]}.{text[1:4]}e+{len(text) - 1}"
    if isinstance(x, int) or (x.is_integer() and abs(x) < 1e6):
        return str(int(x))
    return f"{x:g}"


@dataclass(frozen=True)
class Range:
    """Numbers from ``lo`` to ``hi`` (inclusive unless ``*_open``); ``whole``: a float field
    whose value megatron truncates to an integer, so a fraction would be silently lost."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    whole: bool = False

    @staticmethod
    def applies(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    def problem(self, x: int | float) -> str | None:
        """Why ``x`` is out of range, or None."""
        if isinstance(x, float) and not math.isfinite(x):
            return f"must be a finite number, got {x}"
        if x < self.lo or (self.lo_open and x == self.lo):
            return f"must be {'>' if self.lo_open else '>='} {_num(self.lo)}, got {_num(x)}"
        if x > self.hi or (self.hi_open and x == self.hi):
            return f"must be {'<' if self.hi_open else '<='} {_num(self.hi)}, got {_num(x)}"
        if self.whole and x != int(x):
            return f"must be a whole number (megatron takes an integer), got {_num(x)}"
        return None

    def text(self) -> str:
        """Interval notation for the docs, e.g. ``(0, 1]``."""
        return (f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}"
                f"{')' if self.hi_open else ']'}" + (" whole" if self.whole else ""))


@dataclass(frozen=True)
class Items:
    """What a list field may hold: numbers in ``numbers`` (integers only with ``integers``),
    strings (of at most MAX_STRING characters) when ``strings``; at most ``max_len`` items."""

    numbers: Range | None = None
    integers: bool = False
    strings: bool = False
    max_len: int = 65536

    @staticmethod
    def applies(x: Any) -> bool:
        return isinstance(x, list)

    def problem(self, items: list) -> str | None:
        if len(items) > self.max_len:
            return f"has {len(items)} items, at most {self.max_len} allowed"
        for i, x in enumerate(items):
            number = isinstance(x, (int, float)) and not isinstance(x, bool)
            if number and self.numbers is not None and (not self.integers or isinstance(x, int)):
                why = self.numbers.problem(x)
                if why:
                    return f"item {i}: {why}"
            elif isinstance(x, str) and self.strings:
                if len(x) > MAX_STRING:
                    return f"item {i}: a string of {len(x)} characters, at most {MAX_STRING}"
            else:
                return f"item {i}: {short_repr(x)} is not {self._kinds()}"
        return None

    def _kinds(self) -> str:
        kinds = ([("an integer" if self.integers else "a number") + f" in {self.numbers.text()}"]
                 if self.numbers else []) + (["a string"] if self.strings else [])
        return " or ".join(kinds)

    def text(self) -> str:
        return "list of " + self._kinds().replace("an integer", "integers").replace(
            "a number", "numbers").replace("a string", "strings")


@dataclass(frozen=True)
class Entries:
    """What a mapping field may hold: at most ``max_len`` entries named by ``names`` (a regex),
    each value one string or a non-empty list that ``items`` allows, no empty string in it."""

    items: Items
    names: str = r"[A-Za-z0-9_.-]+"
    max_len: int = 1024

    @staticmethod
    def applies(x: Any) -> bool:
        return isinstance(x, dict)

    def problem(self, entries: dict) -> str | tuple[str, str] | None:
        """Why ``entries`` is refused (a tuple: the entry's name and why), or None."""
        if len(entries) > self.max_len:
            return f"has {len(entries):,} entries, at most {self.max_len} allowed"
        for name, value in entries.items():
            if re.fullmatch(self.names, name) is None:
                return f"{short_repr(name)}: names use letters, digits, '_', '.', '-' only"
            items = value if isinstance(value, list) else [value]
            if not items or "" in items:
                return name, "must be a dataset prefix or a [weight, prefix, ...] blend"
            why = self.items.problem(items)
            if why:
                return name, why
        return None

    def text(self) -> str:
        return "names -> one string or a " + self.items.text()


Rule = Range | Items | Entries


def setting(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
            bounds: Rule | tuple[Rule, ...] = (), resume: str | None = None) -> Any:
    """A schema field with its ``bounds`` (one rule, or a Range and an Items) and its
    ``resume`` policy (None: its section's). ``factory`` instead of ``default`` for a list or
    dict default."""
    if resume is not None and resume not in POLICIES:
        raise ValueError(f"resume policy {resume!r} is not one of {POLICIES}")
    meta = {"bounds": bounds if isinstance(bounds, tuple) else (bounds,), "resume": resume}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, resume: str | None = None) -> Any:
    """A field holding a section; ``resume``: the policy of its fields that declare none."""
    return setting(factory=cls, resume=resume)


def bounds_of(f: dataclasses.Field) -> tuple[Rule, ...]:
    return f.metadata.get("bounds", ())


def problem(name: str, f: dataclasses.Field, value: Any) -> tuple[str, str] | None:
    """(where, why) when ``value`` (already of the field's type) is outside ``f``'s declared
    bounds: ``where`` is ``name``, or ``name.entry`` for one entry of a mapping; else None.
    None of an optional field and a bool are always within them."""
    for rule in bounds_of(f):
        why = rule.problem(value) if rule.applies(value) else None
        if isinstance(why, tuple):
            return f"{name}.{clip(why[0])}", why[1]
        if why:
            return name, why
    return None


def arms(tp: Any) -> tuple:
    """The alternatives of a union annotation (``int | None`` -> (int, NoneType)), else (tp,)."""
    union = typing.get_origin(tp) in (Union, types.UnionType)
    return typing.get_args(tp) if union else (tp,)


@dataclass(frozen=True)
class Leaf:
    """One field of the tree: ``section.key``, its dataclass field, annotation and resume
    policy (declared, else inherited; None when neither declares one)."""

    name: str
    field: dataclasses.Field
    annotation: Any
    resume: str | None


def leaves(cls: type, prefix: str = "", resume: str | None = None) -> Iterator[Leaf]:
    """Every non-section field of the dataclass tree ``cls``, depth first, in schema order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, policy = hints[f.name], f.metadata.get("resume") or resume
        if dataclasses.is_dataclass(tp):
            yield from leaves(tp, f"{prefix}{f.name}.", policy)
        else:
            yield Leaf(f"{prefix}{f.name}", f, tp, policy)
