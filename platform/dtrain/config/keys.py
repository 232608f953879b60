"""`dtrain keys RECIPE [overrides]`: every key the recipe's task accepts, with its type, default,
the value this recipe gives it and its docstring, read from the config dataclasses themselves
(the attribute docstrings under each field), so the listing never drifts from the schema.
Imports no torch."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any

from dtrain.config.recipe import key_of, to_dict


@dataclasses.dataclass
class Key:
    key: str
    type: str
    default: Any
    value: Any
    doc: str


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` and of its bases (the nearest wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (a class made at run time)
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def keys(cfg: Any, prefix: str = "") -> list[Key]:
    """Every leaf key of config `cfg` (a dataclass instance), depth first in field order."""
    out: list[Key] = []
    hints, docs, values = typing.get_type_hints(type(cfg)), field_docs(type(cfg)), to_dict(cfg)
    for f in dataclasses.fields(cfg):
        name = key_of(f.name)
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += keys(value, f"{prefix}{name}.")
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        out.append(
            Key(
                f"{prefix}{name}", _type_name(hints[f.name]), to_dict_value(default), values[name], docs.get(f.name, "")
            )
        )
    return out


def to_dict_value(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def set_paths(raw: dict[str, Any], prefix: str = "") -> set[str]:
    """The dotted keys a raw recipe (with its overrides) sets, down to its leaves."""
    out: set[str] = set()
    for name, value in raw.items():
        path = f"{prefix}{name}"
        out |= set_paths(value, f"{path}.") if isinstance(value, dict) and value else {path}
    return out


def render(rows: list[Key], changed_only: bool = False, given: set[str] | frozenset[str] = frozenset()) -> str:
    """One block per key: `key = value  (type, default D)` and its docstring, indented. A key
    in `given` (the recipe sets it) at its default value says so, and `changed_only` keeps it:
    a value the recipe states stays visible when a default moves to meet it."""
    lines = []
    for k in rows:
        stated = k.key in given or any(g.startswith(k.key + ".") for g in given)
        if changed_only and k.value == k.default and not stated:
            continue
        if k.value != k.default:
            mark = f"   (default {k.default!r})"
        else:
            mark = "   (set, equal to the default)" if stated else ""
        lines.append(f"{k.key} = {k.value!r}   [{k.type}]{mark}")
        if k.doc:
            lines += ["    " + line for line in textwrap.wrap(k.doc, 96)]
    return "\n".join(lines)
