"""What a recipe trains. A task supplies its config class, data, model, loss and eval.

Built-ins: `cnn`, `transformer`, `gan`, `hf_causal_lm`, `hf_sequence_classification`. A user
task subclasses `dtrain.Task` (`dtrain.tasks.supervised`), or `dtrain.protocols.BaseTask` for
several models, and a recipe names it as `task: mypackage.mymodule:MyTask`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import logging
import os
import sys
from typing import Any, Collection, Sequence, cast

from dtrain.config import Config, recipe
from dtrain.config.schema import compose
from dtrain.errors import ConfigError
from dtrain.protocols import BaseTask, ModelSpec, StepOutput
from dtrain.tasks.supervised import Task

log = logging.getLogger("dtrain")

__all__ = ["BUILTIN", "Task", "ModelSpec", "StepOutput", "get_task", "load_config", "run_config"]

BUILTIN = {
    "cnn": "dtrain.tasks.cnn:CNNTask",
    "transformer": "dtrain.tasks.transformer:TransformerTask",
    "gan": "dtrain.tasks.gan:GANTask",
    "hf_causal_lm": "dtrain.tasks.hf:CausalLMTask",
    "hf_sequence_classification": "dtrain.tasks.hf:SequenceClassificationTask",
}


def get_task(name: str, search: Sequence[str | os.PathLike[str]] = ()) -> type[BaseTask]:
    """The task class `name` names: a built-in, or `package.module:Class`, imported from the
    Python path and then from `search` (the working directory and the recipe's folder: a task
    module beside its recipe imports without PYTHONPATH)."""
    target = BUILTIN.get(name, name)
    if ":" in target:
        _find_beside(target.partition(":")[0].split(".")[0], search)
    if ":" not in target:
        close = difflib.get_close_matches(name, list(BUILTIN), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError("task", name, f"must be one of {'|'.join(BUILTIN)} or package.module:Class{hint}")
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError("task", name, f"cannot import {target}: {e}") from None
    if not isinstance(cls, type):
        raise ConfigError("task", name, f"{target} is not a class (a task is a class with the Task interface)")
    return cast("type[BaseTask]", cls)


def _find_beside(top: str, search: Sequence[str | os.PathLike[str]]) -> None:
    """A task module the Python path does not have, found in one of the `search` folders:
    that one folder is appended to the Python path (after the installed packages, so it never
    shadows them), and the run says so. No other folder is added."""
    if top in sys.modules or importlib.util.find_spec(top) is not None:
        return
    for folder in map(os.path.abspath, search):
        if os.path.isfile(os.path.join(folder, f"{top}.py")) or os.path.isfile(
            os.path.join(folder, top, "__init__.py")
        ):
            if folder not in sys.path:
                sys.path.append(folder)
                log.info("task module %s imported from %s (added to the Python path)", top, folder)
            return


def load_config(
    path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    trust: bool = True,
    *,
    sections: dict[str, type],
    allowed: Collection[str] = (),
) -> Config:
    """Recipe YAML + `a.b=c` overrides -> the validated config of the task the recipe names,
    with `sections` composed in beside its own (the features': `dtrain.load_config` passes them).

    A recipe is the user's own (`trust`): its task module is looked for on the Python path,
    then in the working directory, then in the recipe's folder. A run folder's config.yaml is
    read with `trust=False` unless the user says the run is theirs: it may name only a task
    dtrain ships, or one of `allowed` (`refuse_run_task`), and no folder is searched."""
    raw, task = _read(path, overrides, trust, allowed)
    _data_beside(raw, _search(path, trust))
    return recipe.build(compose(task.config_class, sections), raw)


def run_config(
    path: str | os.PathLike[str], trust: bool = False, allowed: Collection[str] = (), hint: str = ""
) -> Config:
    """A finished run's config.yaml as its task's config alone, for its model (`dtrain.tasks.runs`):
    sections the task does not know (the features', or a newer version's) are left out, and
    nothing is checked but names and types (its data may be gone). Read as `load_config` reads
    a run folder: untrusted unless `trust`."""
    raw, task = _read(path, (), trust, allowed, hint or TRUST_HINT)
    known = {recipe.key_of(f.name) for f in dataclasses.fields(task.config_class)}
    return recipe.build(task.config_class, {k: v for k, v in raw.items() if k in known}, validate=False)


def _search(path: str | os.PathLike[str], trust: bool) -> list[str]:
    return [os.getcwd(), os.path.dirname(os.path.abspath(path))] if trust else []


def _read(
    path: str | os.PathLike[str],
    overrides: Sequence[str],
    trust: bool,
    allowed: Collection[str] = (),
    hint: str = "",
) -> tuple[dict[str, Any], type[BaseTask]]:
    raw = recipe.read_raw(path, overrides)
    name = str(raw.get("task", Config.task))
    if not trust:
        refuse_run_task(name, path, allowed, hint or TRUST_HINT)
    return raw, get_task(name, search=_search(path, trust))


TRUST_HINT = "if the run is yours, add --trust (in Python: trust=True) to import its task"


def refuse_run_task(
    name: str, path: str | os.PathLike[str], allowed: Collection[str] = (), hint: str = TRUST_HINT
) -> None:
    """A run folder from elsewhere imports nothing: its config.yaml may name a task dtrain ships
    (or one of `allowed`, already imported for the caller's own recipe); any other name (its
    own task module, or any installed module, whose import would run code) is refused."""
    if name in BUILTIN or name in allowed:
        return
    raise ConfigError("task", name, f"is not a task dtrain ships, and {path} is in a run folder, which imports "
                      f"no code on its own: {hint}")  # fmt: skip


def _data_beside(raw: dict[str, Any], search: Sequence[str]) -> None:
    """A relative `data.path` is looked for where the task module is: in the working directory,
    then beside the recipe (`dtrain train mytask/recipe.yaml` from the folder above finds
    `mytask/data`). Found beside the recipe, it is made absolute, so config.yaml says where."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    where = data.get("path")
    if not isinstance(where, str) or not where or os.path.isabs(where) or os.path.exists(where):
        return
    for folder in search[1:]:
        if os.path.exists(os.path.join(folder, where)):
            data["path"] = os.path.join(folder, where)
            return
