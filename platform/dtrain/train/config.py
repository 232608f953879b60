"""The recipe of a training job: the task's config composed with every feature's section,
loaded from YAML and overrides, and every refused combination found before any rank starts."""

from __future__ import annotations

import os
from typing import Sequence

from dtrain import features, tasks
from dtrain.config import Config
from dtrain.engines import engine_class


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = (), trust: bool = True) -> Config:
    """Recipe YAML + `a.b=c` overrides -> the validated config (names checked, values typed and
    in range). A task module is looked for on the Python path, then in the working directory,
    then in the recipe's folder. A run folder's config.yaml is loaded with `trust=False` unless
    the run is the user's: then it may name only a task dtrain ships."""
    return tasks.load_config(path, overrides, trust, sections=features.sections())


def validate(cfg: Config) -> None:
    """What the engine refuses in the recipe, and every feature it turns on that needs what the
    engine or the task lacks: one ConfigError line, before any work (the CLI runs this before
    torchrun starts any rank; each rank again, for launches that bypass the CLI)."""
    engine, task = engine_class(cfg.engine), tasks.get_task(cfg.task)
    engine.validate(cfg)
    features.validate(cfg, engine.capabilities(cfg) | task.capabilities, cfg.engine, cfg.task)
