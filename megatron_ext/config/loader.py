"""YAML -> typed Config, with strict keys/types, dotted overrides and a YAML dump.

The one YAML reader for configs (files and ``--set`` values): duplicate keys at any depth,
syntax errors, binary or non-UTF-8 files all become one ConfigError naming the source and line.
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

from megatron_ext.config.schema import Config
from megatron_ext.errors import UserError


class ConfigError(UserError, ValueError):
    """A config problem; the message names the field (``section.key``) and the reason."""


# A config is a few KiB; a larger file is not one (and is not read into memory whole).
MAX_CONFIG_BYTES = 1 << 20
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _DuplicateKey(yaml.YAMLError):
    """Raised by _StrictLoader; its text is the whole message after the source name."""


class _NotFinite(ConfigError):
    """A number of the right type but NaN/inf: said as such, also for optional fields."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML silently keeps the last,
    so ``lr`` written twice would train with whichever came second)."""

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
                    raise _DuplicateKey(
                        f"duplicate key {key!r} at line {key_node.start_mark.line + 1}, column "
                        f"{key_node.start_mark.column + 1} (first at line {first.line + 1})")
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python objects; every parse failure is one ConfigError naming ``source``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: invalid YAML{where}: {e.problem or e.context}") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (NUL, controls)
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(f"{source}: invalid YAML at line {line}: character "
                          f"{chr(e.character)!r} is not allowed") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None


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


def short_repr(value: Any) -> str:
    """repr() cut to one readable line: a message quotes the value, not a megabyte of it."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


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
        raise ConfigError(f"{where}: expected a number, got {short_repr(value)}")
    if not math.isfinite(number):
        raise _NotFinite(f"{where}: must be a finite number, got {short_repr(value)}")
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
            except _NotFinite:
                raise
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {short_repr(value)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            allowed = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{where}: {short_repr(value)} is not one of {allowed}")
        return value
    if tp is float:
        return _finite_float(value, where)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {short_repr(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {short_repr(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {short_repr(value)}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {short_repr(value)}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: expected a mapping of names, got {short_repr(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {tp!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {short_repr(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"{where or 'config'}: key {short_repr(odd[0])} is not a field name")
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"{dotted}: expected section.key")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=c`` -> ("a.b", yaml-scalar c)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not all(key.split(".")):
        raise ConfigError(f"--set {text}: expected section.key=value")
    return key, parse_yaml(raw, f"--set {key}") if raw != "" else ""


Overrides = Iterable[str] | Mapping[str, Any]


def _override_pairs(overrides: Overrides) -> Iterable[tuple[str, Any]]:
    """(dotted key, value) pairs: ``a.b=c`` texts are parsed, a mapping's values taken as given."""
    if isinstance(overrides, Mapping):
        return overrides.items()
    if isinstance(overrides, str):  # one text, not its characters
        overrides = [overrides]
    return (parse_override(text) for text in overrides)


def _set_all(tree: dict, overrides: Overrides) -> dict:
    for key, value in _override_pairs(overrides):
        _set_dotted(tree, key, value)
    return tree


def apply_overrides(cfg: Config, overrides: Overrides) -> Config:
    """A new Config: ``cfg`` with dotted overrides applied (``["train.seed=1"]`` as given to
    ``--set``, or ``{"train.seed": 1}``) and every field type-checked again, so a wrong type or
    an unknown key is one ConfigError naming it. ``cfg`` itself is not changed."""
    return _build(Config, _set_all(to_dict(cfg), overrides), "")


def load_config(path: str | Path | None, overrides: Overrides = ()) -> Config:
    """Load a YAML file (or the defaults when ``path`` is None) and apply ``a.b=c`` overrides."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        tree = parse_yaml(read_config_text(p), str(p))
        tree = {} if tree is None else tree  # an empty file (or only comments): the defaults
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return _build(Config, _set_all(tree, overrides), "")


def config_from_dict(tree: dict) -> Config:
    return _build(Config, tree, "")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
