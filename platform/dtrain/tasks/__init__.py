"""What a recipe trains. A task supplies its config class, data, model, loss and eval.

Built-ins: `cnn`, `transformer`, `gan`. A user task is any class with the `Task`
interface, named in a recipe as `task: mypackage.mymodule:MyTask`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import math
import os
import sys
from typing import Any, Sequence, cast

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from dtrain import protocols
from dtrain.tasks import finetune
from dtrain.config import recipe
from dtrain.tasks import supervised
from dtrain.config import Config
from dtrain.errors import ConfigError
from dtrain.tasks.initialization import initialize
from dtrain.protocols import Engine, ModelSpec, StepOutput

log = logging.getLogger("dtrain")

__all__ = ["BUILTIN", "Task", "ModelSpec", "StepOutput", "get_task", "load_config"]

BUILTIN = {"cnn": "dtrain.tasks.cnn:CNNTask", "transformer": "dtrain.tasks.transformer:TransformerTask",
           "gan": "dtrain.tasks.gan:GANTask", "hf_causal_lm": "dtrain.tasks.hf:CausalLMTask",
           "hf_sequence_classification": "dtrain.tasks.hf:SequenceClassificationTask"}


class Task(protocols.Task):
    """The supervised task: one model called `model`, stepped by `dtrain.tasks.supervised.train_step`
    and evaluated by `dtrain.tasks.supervised.evaluate`. A task implements `datasets`, `build_model`,
    `loss`, `eval_sums` and `eval_metrics`; the rest has defaults (see `protocols.Task`)."""

    config_class: type[Config] = Config

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def inference_model(self) -> nn.Module:
        return self.build_model()

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean loss of one micro-batch (already on the device). Default: `output_loss` of
        `outputs`; a task that implements those two can be distilled (`dtrain.features.distill`)."""
        return self.output_loss(self.outputs(model, batch), batch)

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model's logits for a batch, (..., classes): what distillation matches between a
        teacher and a student, and what the Fisher information of `ewc` is taken from. Default:
        `model(batch[0])`."""
        out: torch.Tensor = model(batch[0])
        return out

    def output_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """The task's loss given `outputs(model, batch)` (implement it, or `loss`)."""
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Per-batch *sums* (e.g. loss_sum, correct, count); they are added over batches and
        ranks, then `eval_metrics` turns them into metrics: exact at any world size."""
        raise NotImplementedError

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def zero_inputs(self, batch: Any) -> Any:
        """The batch with its inputs zeroed and its targets kept (`dtrain check`'s
        input-independent baseline). Default: a batch (inputs, *targets)."""
        return (torch.zeros_like(batch[0]), *batch[1:])

    def expected_init_loss(self, model: nn.Module, batch: Any) -> float | None:
        """The loss a correct initialisation gives (`dtrain check`'s `init_loss`). Default: a
        classifier (outputs (..., C), integer targets of the outputs' leading shape) starts at
        ln(C), the cross-entropy of a uniform guess; None when the task is not of that shape."""
        inputs, targets = batch[0], batch[-1]
        with torch.no_grad():
            out = model(inputs)
        if (isinstance(out, torch.Tensor) and isinstance(targets, torch.Tensor) and not targets.is_floating_point()
                and out.dim() >= 2 and out.shape[:-1] == targets.shape and out.shape[-1] > 1):
            return math.log(out.shape[-1])
        return None

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The model's repeated units (see `ModelSpec.blocks`). Default: none, one unit."""
        return []

    def init_weights(self, model: nn.Module) -> None:
        """What follows `model.init`'s scheme (runs for `default` too): e.g. zero-initialised
        residual branches, an output bias from the class prior. Default: nothing."""

    def models(self) -> dict[str, ModelSpec]:
        model = self.build_model()
        initialize(model, self.cfg.model.init)
        self.init_weights(model)
        start = self.cfg.model.init_from or self.cfg.ewc.from_  # EWC continues from the run it anchors to
        if start:
            finetune.init_from(model, start)
        finetune.freeze(model, self.cfg.model.freeze)
        return {"model": ModelSpec(model, self.cfg.optim, broadcast_buffers=not self.cfg.model.sync_bn,
                                   blocks=self.blocks(model))}

    objective: Any = None
    """Set by the trainer when the recipe distills, consolidates (ewc) or prunes: the loss
    terms beside the task's own (`dtrain.train.objective.Objective`)."""

    def train_step(self, engines: dict[str, Engine], micro_batches: list[Any]) -> StepOutput:
        return supervised.train_step(engines["model"], self, micro_batches, self.objective)

    def evaluate(self, engines: dict[str, Engine], loader: DataLoader[Any], device: torch.device) -> dict[str, float]:
        return supervised.evaluate(engines["model"], self, loader, device)


def get_task(name: str, search: Sequence[str | os.PathLike[str]] = ()) -> type[protocols.Task]:
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
    return cast("type[protocols.Task]", cls)


def _find_beside(top: str, search: Sequence[str | os.PathLike[str]]) -> None:
    """A task module the Python path does not have, found in one of the `search` folders:
    that one folder is appended to the Python path (after the installed packages, so it never
    shadows them), and the run says so. No other folder is added."""
    if top in sys.modules or importlib.util.find_spec(top) is not None:
        return
    for folder in map(os.path.abspath, search):
        if os.path.isfile(os.path.join(folder, f"{top}.py")) or os.path.isfile(os.path.join(folder, top, "__init__.py")):
            if folder not in sys.path:
                sys.path.append(folder)
                log.info("task module %s imported from %s (added to the Python path)", top, folder)
            return


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = (), beside: bool = True) -> Config:
    """Recipe YAML + `a.b=c` overrides -> the validated config of the task the recipe names.
    A task module is looked for on the Python path, then in the working directory, then
    (`beside`) in the recipe's folder. A run's config.yaml is read with `beside=False`: a run
    folder from elsewhere must not bring code with it."""
    raw = recipe.read_raw(path, overrides)
    search = [os.getcwd(), *([os.path.dirname(os.path.abspath(path))] if beside else [])]
    task = get_task(str(raw.get("task", Config.task)), search=search)
    _data_beside(raw, search)
    return recipe.build(task.config_class, raw)


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
