"""A recipe file and its overrides -> a validated `Config`; a `Config` -> YAML and flat params.

Loading checks names (with a did-you-mean), converts values to the field's type and runs
`Config.validate`, so that bad input fails with one line naming the key before any rank
trains. Imports no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from dtrain.config import Config, redact
from dtrain.errors import ConfigError
from dtrain.runtime.files import atomic_write

# --------------------------------------------------------------------------- loading


def read_raw(recipe: str | os.PathLike[str], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Recipe YAML with `a.b=c` overrides applied, still untyped (the task it names picks the
    config class: `dtrain.tasks.load_config`)."""
    raw = read_recipe(recipe)
    for item in overrides:
        apply_override(raw, item)
    raw.setdefault("recipe", Path(recipe).stem)
    return raw


def build(cls: type[Config], raw: dict[str, Any], validate: bool = True) -> Config:
    """The config of class `cls` (a task's `config_class`) from a raw recipe, its names and
    types checked, and with `validate` its ranges and files."""
    cfg: Config = from_dict(cls, raw)
    if not cfg.output_dir:
        cfg.output_dir = str(Path("runs") / cfg.recipe)
    if validate:
        cfg.validate()
    return cfg


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("recipe", str(path), "no such file (pass a YAML recipe, e.g. recipes/cnn_digits.yaml)")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError("recipe", str(path), f"malformed YAML at{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("recipe", str(path), "must be a YAML mapping of keys to values")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b=c` in a nested dict; the value is parsed as YAML (so 3, 1e-3, true, [1,2])."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("", item, f"override {item!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), child, f"is a value, not a section, so {key} cannot be set")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, converting and checking every value."""
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip("."), raw, "must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {key_of(f.name): f.name for f in dataclasses.fields(cls)}
    names = list(fields)
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{prefix}{key}", raw[key], f"unknown key{hint}")
    kwargs = {}
    for name, attr in fields.items():
        if name not in raw:
            continue
        tp, key = hints[attr], f"{prefix}{name}"
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[attr] = from_dict(tp, raw[name], key + ".")
        else:
            kwargs[attr] = convert(raw[name], tp, key)
    return cls(**kwargs)


def key_of(attr: str) -> str:
    """A field's recipe key: a field named after a Python keyword ends in `_` (PEP 8), its key
    does not (`checkpoint.async_` is `checkpoint.async`)."""
    return attr[:-1] if attr.endswith("_") and keyword.iskeyword(attr[:-1]) else attr


def _convert_union(value: Any, args: tuple[Any, ...], key: str) -> Any:
    """`X | None`, or e.g. `int | Literal["auto"]`: the first member the value converts to."""
    if value is None and type(None) in args:
        return None
    inner = [a for a in args if a is not type(None)]
    for tp in inner[:-1]:
        try:
            return convert(value, tp, key)
        except ConfigError:
            pass
    try:
        return convert(value, inner[-1], key)
    except ConfigError as e:
        if len(inner) == 1:
            raise
        raise ConfigError(key, value, "must be " + " or ".join(_kind(a) for a in inner)) from e


def _kind(tp: Any) -> str:
    """How a union's member reads in an error line."""
    if typing.get_origin(tp) is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to type `tp`, or raise ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, args, key)
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(key, value, f"must be one of {'|'.join(map(str, args))}{hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, f"must be a list, e.g. {key}=[1,2]")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(key, value, f"must be a list of {len(args)} values")
            return tuple(convert(v, a, key) for v, a in zip(value, args))
        return origin(convert(v, args[0], key) for v in value) if args else origin(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "must be a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "must be true or false")
    if tp is int:
        number = _number(value)
        if number is None or not math.isfinite(number) or float(number) != int(number):
            raise ConfigError(key, value, "must be an integer")
        return int(number)
    if tp is float:
        number = _number(value)
        if number is None or math.isnan(number):
            raise ConfigError(key, value, "must be a number")
        return float(number)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(key, value, "must be a string")
        return "" if value is None else str(value)
    raise TypeError(f"config field {key} has unsupported type {tp}")


def _number(value: Any) -> float | int | None:
    # PyYAML reads `1e-3` as a string (YAML 1.1 wants `1.0e-3`); accept it as users write it.
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


# --------------------------------------------------------------------------- output


def to_dict(cfg: Any) -> dict[str, Any]:
    """Config -> plain nested dict (tuples as lists) for YAML and MLflow."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {key_of(k): plain(x) for k, x in v.items()}
        return v

    out: dict[str, Any] = plain(dataclasses.asdict(cfg))
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; the form MLflow params and overrides use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dump_yaml(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write the resolved config atomically, so a reader never sees half a file; passwords in
    URLs are masked (`dtrain.config.redact`)."""
    text = yaml.safe_dump(redact.tree(to_dict(cfg)), sort_keys=False)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))
