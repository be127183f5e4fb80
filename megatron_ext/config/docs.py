"""Generate docs/config.md from the field docstrings in schema.py (``python -m
megatron_ext.config.docs > docs/config.md``); a test keeps the two in sync and checks that
every field has a docstring."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing

from megatron_ext.config import schema
from megatron_ext.config.fields import leaves
from megatron_ext.config.ranges import describe


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings: the string literal right after each annotated field."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:] + [None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def sections() -> list[tuple[str, type]]:
    out = []

    def walk(prefix: str, cls: type) -> None:
        out.append((prefix, cls))
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(default):
                walk(f"{prefix}.{f.name}" if prefix else f.name, type(default))

    walk("", schema.Config)
    return out[1:]


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated from `megatron_ext/config/schema.py` by "
             "`python -m megatron_ext.config.docs`. Override any field with "
             "`--set section.key=value` (YAML syntax). *resume*: what a rerun on an existing "
             "`checkpoint.save` does when the field changed -- `arch`: refused (the tensors "
             "do not fit), `run`: refused unless `checkpoint.allow_config_change`, `free`: "
             "allowed.", ""]
    resume = {leaf.name: leaf.resume for leaf in leaves(schema.Config)}
    for name, cls in sections():
        docs = field_docs(cls)
        lines += [f"## `{name}`", "", "| field | default | range | resume | meaning |",
                  "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
                if dataclasses.is_dataclass(default):
                    continue
            else:
                default = f.default
            bounds = describe(f"{name}.{f.name}") or _choices(typing.get_type_hints(cls)[f.name])
            lines.append(f"| `{f.name}` | `{default!r}` | {f'`{bounds}`' if bounds else ''} | "
                         f"{resume[f'{name}.{f.name}']} | {docs.get(f.name, '')} |")
        lines.append("")
    return "\n".join(lines)


def _choices(tp: type) -> str:
    """'one of a, b' for a Literal field ('' otherwise)."""
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    return ""


if __name__ == "__main__":
    print(render(), end="")
