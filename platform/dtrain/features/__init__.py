"""Training features: each module here holds one `dtrain.protocols.Feature` and its config
section, and is found by looking here (`registry`), so a new feature is one new module: the
recipe schema, the checks before launch, the loop, resume and the combination matrix take it
from the registry. See the `Feature` docstring for the loop and its hooks.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from dtrain.errors import ConfigError
from dtrain.protocols import Feature


@functools.cache
def registry() -> tuple[type[Feature], ...]:
    """Every feature class defined in this package, by `order` (then name)."""
    found: list[type[Feature]] = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += [
            v
            for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, Feature) and v is not Feature and v.__module__ == module.__name__
        ]
    return tuple(sorted(found, key=lambda f: (f.order, f.__name__)))


def sections() -> dict[str, type]:
    """The recipe sections the features own: key -> dataclass."""
    return {f.key: f.config_class for f in registry() if f.key and f.config_class is not None}


def enabled(cfg: Any) -> list[type[Feature]]:
    """The features `cfg` turns on, in hook order."""
    return [f for f in registry() if f.enabled(cfg)]


def validate(cfg: Any, offered: frozenset[str], engine: str, task: str) -> None:
    """Refuse, in one line, a feature the recipe turns on that needs what the engine or the
    task does not offer (`offered`: both their capabilities), or that its `check` refuses."""
    for feature in enabled(cfg):
        feature.check(cfg)
        for need, why in feature.requires.items():
            if need not in offered:
                key, value = feature.switch(cfg)
                whose = f"the task {task}" if need == "supervised" else f"engine={engine}"
                raise ConfigError(key, value, f"not with {whose}: {why}")
