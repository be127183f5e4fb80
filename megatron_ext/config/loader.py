"""YAML -> typed Config, with strict keys/types/bounds, dotted overrides and a YAML dump.

The one YAML reader for configs (files, ``--set`` values, a checkpoint's saved config):
duplicate keys at any depth, syntax errors, binary or non-UTF-8 files, aliases that expand a
document past what a config file may hold ("billion laughs") all become one ConfigError naming
the source and line. The one constructor: every Config built here -- from a file, ``--set``,
a saved config, a dict -- has each field checked against its type and its declared bounds
(``schema.py``) before anything is sized from it. Every message is one line of bounded length:
values are quoted with ``short_repr``, names with ``clip``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megatron_ext.config.fields import MAX_STRING, Leaf, clip, leaves, problem, short_repr
from megatron_ext.config.schema import Config
from megatron_ext.errors import UserError

# A config is a few KiB; a larger file is not one (and is not read into memory whole).
MAX_CONFIG_BYTES = 1 << 20
# What a document may expand to through its aliases, in nodes + scalar characters (a file
# without aliases counts about its length): past it, anything that walks the values (a
# message, a copy, a comparison) would take exponential time.
MAX_EXPANDED = 2 * MAX_CONFIG_BYTES
MAX_MESSAGE = 500  # characters of a ConfigError: a message is read, not scrolled
_MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigError(UserError, ValueError):
    """A config problem; the message names the field (``section.key``) and the reason, on one
    line of at most about MAX_MESSAGE characters whatever was formatted into it."""

    def __init__(self, message: object = "") -> None:
        text = str(message)
        if len(text) > MAX_MESSAGE:
            text = f"{text[:MAX_MESSAGE - 30]}...({len(text)} characters)"
        super().__init__(text)


class _FieldError(ConfigError):
    """A problem with the value at ``field`` (dotted; '' = the whole tree)."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{clip(field) or 'config'}: {why}")
        self.field, self.why = field, why

    def __reduce__(self) -> tuple:  # pickled across processes with both arguments
        return type(self), (self.field, self.why)


class _TooBig(_FieldError):
    """A value of the right type past what the type allows (NaN/inf, a string too long):
    said as such, also for optional fields."""


class _Refused(yaml.YAMLError):
    """Raised by _StrictLoader; its text is the whole message after the source name."""


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def check_expansion(root: yaml.Node, budget: int = MAX_EXPANDED) -> None:
    """Raise _Refused when the document, every alias expanded, holds more than ``budget`` nodes
    plus scalar characters, or an alias inside its own anchor (a cycle). Each node is sized
    once (aliases share their node), without recursion: linear in the composed text."""
    size: dict[int, int] = {}
    open_ids: set[int] = set()  # nodes whose children are being sized: the current path
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            open_ids.discard(id(node))
            own = 1 + (len(node.value) if isinstance(node, yaml.ScalarNode) else 0)
            size[id(node)] = own + sum(size[id(c)] for c in _children(node))
            if size[id(node)] > budget:
                raise _Refused(f"aliases expand it past {budget:,} nodes and characters, "
                               "more than a config file may hold (an alias bomb?)")
            continue
        if id(node) in size:
            continue
        open_ids.add(id(node))
        stack.append((node, True))
        for child in _children(node):
            if id(child) in open_ids:
                raise _Refused(f"recursive alias at line {child.start_mark.line + 1} (an "
                               "anchor used inside itself)")
            stack.append((child, False))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML silently keeps the last,
    so ``lr`` written twice would train with whichever came second), and a document whose
    aliases expand it past MAX_EXPANDED (checked before anything is constructed)."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        if node is not None:
            check_expansion(node)
        return node

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:  # ``<<: *base``: explicit keys may override it
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # unhashable key: SafeConstructor reports it with its line
                    continue
                if first is not key_node.start_mark:
                    mark = key_node.start_mark
                    raise _Refused(
                        f"duplicate key {short_repr(key)} at line {mark.line + 1}, column "
                        f"{mark.column + 1} (first at line {first.line + 1})")
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python objects; every parse failure is one ConfigError naming ``source``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except _Refused as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: invalid YAML{where}: {clip(e.problem or e.context or '')}"
                          ) from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (NUL, controls)
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(f"{source}: invalid YAML at line {line}: character "
                          f"{chr(e.character)!r} is not allowed") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {clip(str(e))}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as e:  # a scalar Python refuses: 2001-13-45, 5000 digits
        raise ConfigError(f"{source}: invalid YAML: {clip(str(e))}") from None


def read_config_text(p: Path) -> str:
    """The text of a config file, or one ConfigError saying why it is not one."""
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory, not a config file")
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    if not p.is_file():
        raise ConfigError(f"{p}: not a regular file")
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_CONFIG_BYTES >> 20} MiB, not a config file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{p}: not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}); "
                          f"a config is a YAML file") from None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a)
                           for a in typing.get_args(tp))
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string",
             list: "a list"}
    return names.get(tp, getattr(tp, "__name__", str(tp).replace("typing.", "")))


def _finite_float(value: Any, where: str) -> float:
    """A float field's value: a finite number (YAML reads .nan and .inf as floats)."""
    number = None
    if isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it means.
        try:
            number = float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        # An integer beyond float range would raise OverflowError; call it what it is.
        number = math.inf if isinstance(value, int) and abs(value) >= 2**1023 else float(value)
    if number is None:
        raise _FieldError(where, f"expected a number, got {short_repr(value)}")
    if not math.isfinite(number):
        raise _TooBig(where, f"must be a finite number, got {short_repr(value)}")
    return number


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, where)
            except _TooBig:
                raise
            except ConfigError as e:
                errors.append(str(e))
        raise _FieldError(where, f"expected {_type_name(tp)}, got {short_repr(value)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            allowed = ", ".join(repr(a) for a in typing.get_args(tp))
            raise _FieldError(where, f"{short_repr(value)} is not one of {allowed}")
        return value
    if tp is float:
        return _finite_float(value, where)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _FieldError(where, f"expected an integer, got {short_repr(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _FieldError(where, f"expected true/false, got {short_repr(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _FieldError(where, f"expected a string, got {short_repr(value)}")
        if len(value) > MAX_STRING:
            raise _TooBig(where, f"a string of {len(value):,} characters, at most "
                                 f"{MAX_STRING:,} allowed")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise _FieldError(where, f"expected a list, got {short_repr(value)}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _FieldError(where, f"expected a mapping of names, got {short_repr(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise _FieldError(where, f"unsupported type {tp!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    """``cls`` from the mapping ``data``: every key a field, every value of the field's type
    and within its declared bounds (the first problem is a _FieldError naming the field)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _FieldError(where, f"expected a mapping, got {short_repr(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise _FieldError(where, f"key {short_repr(odd[0])} is not a field name")
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise _FieldError(f"{where}.{unknown[0]}" if where else unknown[0],
                          f"unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        dotted = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], dotted)
        found = problem(dotted, fields[name], kwargs[name])
        if found:
            raise _FieldError(*found)
    return cls(**kwargs)


def _overridden(field: str, keys: Iterable[str]) -> bool:
    """Whether an override of one of ``keys`` set ``field`` (or the section or value in it)."""
    return bool(field) and any(field == k or field.startswith(k + ".") or k.startswith(field + ".")
                               for k in keys)


def _checked(tree: Any, source: str | None, overridden: Iterable[str] = ()) -> Config:
    """The one way a Config is built from data: types and bounds checked; a problem with a
    value that came from ``source`` (a file) names it, one from an override does not (the
    override names its field)."""
    try:
        return _build(Config, tree, "")
    except _FieldError as e:
        if source is None or _overridden(e.field, overridden):
            raise
        raise ConfigError(f"{source}: {e}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"{clip(dotted)}: expected section.key")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{clip(dotted)}: {clip(part)} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=c`` -> ("a.b", yaml-scalar c)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not all(key.split(".")):
        raise ConfigError(f"--set {clip(text)}: expected section.key=value")
    return key, parse_yaml(raw, f"--set {clip(key)}") if raw != "" else ""


Overrides = Iterable[str] | Mapping[str, Any]


def _override_pairs(overrides: Overrides) -> Iterable[tuple[str, Any]]:
    """(dotted key, value) pairs: ``a.b=c`` texts are parsed, a mapping's values taken as given."""
    if isinstance(overrides, Mapping):
        return overrides.items()
    if isinstance(overrides, str):  # one text, not its characters
        overrides = [overrides]
    return (parse_override(text) for text in overrides)


def _set_all(tree: dict, overrides: Overrides) -> list[str]:
    """Apply ``overrides`` to ``tree``; returns the dotted keys they set."""
    keys = []
    for key, value in _override_pairs(overrides):
        _set_dotted(tree, key, value)
        keys.append(key)
    return keys


def apply_overrides(cfg: Config, overrides: Overrides, source: str | None = None) -> Config:
    """A new Config: ``cfg`` with dotted overrides applied (``["train.seed=1"]`` as given to
    ``--set``, or ``{"train.seed": 1}``) and every field checked again (type, bounds), so a
    wrong value or an unknown key is one ConfigError naming it. ``source``: where ``cfg``'s
    values came from (e.g. an HF config.json), named when one of them is refused. ``cfg``
    itself is not changed."""
    tree = to_dict(cfg)
    keys = _set_all(tree, overrides)
    return _checked(tree, source, keys)


def _read_tree(path: str | Path) -> dict:
    """The mapping a YAML config file holds (empty file: {}), read within MAX_CONFIG_BYTES and
    MAX_EXPANDED; not yet checked against the schema."""
    p = Path(path)
    tree = parse_yaml(read_config_text(p), str(p))
    tree = {} if tree is None else tree  # an empty file (or only comments): the defaults
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return tree


def load_config(path: str | Path | None, overrides: Overrides = ()) -> Config:
    """Load a YAML file (or the defaults when ``path`` is None) and apply ``a.b=c`` overrides;
    every field checked (type, bounds), a problem in the file naming the file."""
    tree = {} if path is None else _read_tree(path)
    keys = _set_all(tree, overrides)
    return _checked(tree, None if path is None else str(path), keys)


def checked_config_tree(path: str | Path) -> dict:
    """A saved config file's mapping (a checkpoint's ``config.yaml``), after it has passed every
    check ``load_config`` makes; a problem is one ConfigError naming the file and the field."""
    tree = _read_tree(path)
    _checked(tree, str(path))
    return tree


def config_from_dict(tree: dict, source: str | None = None) -> Config:
    """A Config from a mapping (a saved config, one built from an HF config.json), checked as
    ``load_config`` checks a file; ``source`` names the mapping's origin in messages."""
    return _checked(tree, source)


_LEAVES: dict[str, Leaf] = {}


def check_field(dotted: str, value: Any) -> Any:
    """``value`` for the config field ``dotted`` when it comes from outside a config (an HF
    ``config.json``'s ``hidden_size`` is ``model.hidden_size``): checked as a config file's value
    is (type, declared bounds) and returned as the field takes it; ConfigError otherwise (its
    ``why`` says the problem without the field's name)."""
    if not _LEAVES:
        _LEAVES.update((leaf.name, leaf) for leaf in leaves(Config))
    leaf = _LEAVES[dotted]
    value = _coerce(value, leaf.annotation, dotted)
    found = problem(dotted, leaf.field, value)
    if found:
        raise _FieldError(*found)
    return value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
