"""A search space in YAML over any recipe key, checked against the recipe's task before any
trial runs:

    optim.lr: {type: float, low: 0.01, high: 1.0, log: true}
    optim.weight_decay: {type: float, low: 0.0, high: 1.0e-3}
    optim.warmup_steps: {type: int, low: 0, high: 100, step: 10}
    model.norm: {type: categorical, choices: [layernorm, rmsnorm]}
    optim.momentum: {type: float, low: 0.8, high: 0.99, when: {optim.name: sgd}}

`when` makes a key conditional: it is searched only in trials whose value of another key
(searched or fixed in the recipe) equals the given one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dtrain.config import Config
from dtrain.config.recipe import apply_override, build, to_dict
from dtrain.errors import ConfigError

TYPES = ("float", "int", "categorical")


@dataclass
class Param:
    key: str
    type: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)
    when: dict[str, Any] = field(default_factory=dict)

    def suggest(self, trial: Any) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.key, self.choices)

    def grid(self) -> list[Any]:
        """The values a grid search tries: the choices, or every step of an int range."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step:
            n = round((self.high - self.low) / self.step)
            return [self.low + i * self.step for i in range(n + 1)]
        raise ConfigError(f"space.{self.key}", "float without step", "a grid search needs `step` on float keys")


def load_space(path: Path, cfg: Config) -> list[Param]:
    """The space file's parameters; every key must be one of the recipe's (the task's config
    class), every value of its type: a sample of each is put through the config loader."""
    if not path.is_file():
        raise ConfigError("--space", str(path), "no such file (a YAML mapping of recipe keys to ranges)")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("--space", str(path), f"not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or not doc:
        raise ConfigError("--space", str(path), "expected a mapping of recipe keys to {type: ...}")
    params = [_param(str(k), v) for k, v in doc.items()]
    for p in params:
        probe = dict(to_dict(cfg))
        value = p.choices[0] if p.type == "categorical" else (int(p.low) if p.type == "int" else p.low)
        try:
            apply_override(probe, overrides({p.key: value})[0])
            build(type(cfg), probe)
        except ConfigError as e:
            raise ConfigError(f"space.{p.key}", doc[p.key], f"not a valid key or value of this recipe: {e}") from None
    return params


def _param(key: str, spec: Any) -> Param:
    where = f"space.{key}"
    if not isinstance(spec, dict) or spec.get("type") not in TYPES:
        raise ConfigError(where, spec, f"expected {{type: {'|'.join(TYPES)}, ...}}")
    known = {"type", "low", "high", "log", "step", "choices", "when"}
    if set(spec) - known:
        raise ConfigError(
            where, spec, f"unknown field(s) {', '.join(sorted(set(spec) - known))}; valid: {', '.join(sorted(known))}"
        )
    p = Param(
        key,
        spec["type"],
        spec.get("low", 0.0),
        spec.get("high", 0.0),
        bool(spec.get("log", False)),
        spec.get("step"),
        list(spec.get("choices", [])),
        dict(spec.get("when", {})),
    )
    if p.type == "categorical" and not p.choices:
        raise ConfigError(where, spec, "a categorical key needs a non-empty `choices` list")
    if p.type != "categorical" and not p.low <= p.high:
        raise ConfigError(where, spec, "needs low <= high")
    if p.log and p.low <= 0:
        raise ConfigError(where, spec, "a log range needs low > 0")
    return p


def suggest(params: list[Param], trial: Any, fixed: dict[str, Any]) -> dict[str, Any]:
    """This trial's values, in file order; a conditional key only when its condition holds."""
    chosen: dict[str, Any] = {}
    for p in params:
        if all(chosen.get(k, fixed.get(k)) == v for k, v in p.when.items()):
            chosen[p.key] = p.suggest(trial)
    return chosen


def overrides(values: dict[str, Any]) -> list[str]:
    """`key=value` overrides (JSON scalars are YAML: 0.01, "rmsnorm", true)."""
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]
