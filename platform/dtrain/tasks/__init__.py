"""What a recipe trains. A task supplies its config class, data, model, loss and eval.

Built-ins: `cnn`, `transformer`, `gan`. A user task is any class with the `Task`
interface, named in a recipe as `task: mypackage.mymodule:MyTask`.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from dtrain.config import Config, ConfigError, OptimConfig


@dataclass
class ModelSpec:
    """One trained model of a task: it gets its own engine (optimizer, schedule, clipping)."""

    module: nn.Module
    optim: OptimConfig
    steps_per_step: float = 1.0
    """Optimizer steps this model takes per training step (a GAN critic: about n_critic)."""
    broadcast_buffers: bool = True
    """Let DDP copy rank 0's buffers before each forward (off when buffers stay equal anyway)."""


BUILTIN = {"cnn": "dtrain.tasks.cnn:CNNTask", "transformer": "dtrain.tasks.transformer:TransformerTask",
           "gan": "dtrain.tasks.gan:GANTask"}


class Task:
    """What the trainer asks of a task. The defaults are the supervised case: one model
    called `model`, stepped by `dtrain.engine.train_step`, evaluated by `dtrain.engine.evaluate`.
    A task with several models (the GAN) overrides `models`, `train_step`, `evaluate` and
    `final_state_dict`."""

    config_class: type[Config] = Config

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def datasets(self) -> tuple[Dataset, Dataset]:
        """(train, eval) datasets; every rank builds the same ones."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean loss of one micro-batch (already on the device)."""
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Per-batch *sums* (e.g. loss_sum, correct, count); the trainer adds them over
        batches and ranks, then calls `eval_metrics`."""
        raise NotImplementedError

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def models(self) -> dict[str, ModelSpec]:
        return {"model": ModelSpec(self.build_model(), self.cfg.optim,
                                   broadcast_buffers=not self.cfg.model.sync_bn)}

    def micro_batches_per_step(self, accum: int) -> int:
        """Loader batches one training step consumes."""
        return accum

    def train_step(self, engines: dict, micro_batches: list):
        from dtrain.engine import train_step

        return train_step(engines["model"], self, micro_batches)

    def evaluate(self, engines: dict, loader, device: torch.device) -> dict[str, float]:
        from dtrain.engine import evaluate

        return evaluate(self, engines["model"], loader, device)

    def final_state_dict(self, engines: dict) -> dict[str, torch.Tensor]:
        """model.pt: a plain state_dict (collective: every rank calls it)."""
        return engines["model"].consolidated_state_dict()

    def train_metrics(self, logged: dict[str, float]) -> dict[str, float]:
        """Extra metrics derived from the logged ones (e.g. bits per char, tokens/s)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Task state saved with the checkpoint (e.g. a vocabulary)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` saved (on resume)."""

    def summary_extras(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Extra numbers for summary.json, given the trainer's."""
        return {}

    def write_artifacts(self, out_dir: Path, engines: dict) -> list[Path]:
        """Files written beside model.pt at the end (rank 0), also logged to MLflow."""
        return []


def get_task(name: str) -> type[Task]:
    target = BUILTIN.get(name, name)
    if ":" not in target:
        close = difflib.get_close_matches(name, list(BUILTIN), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError("task", name, f"must be one of {'|'.join(BUILTIN)} or package.module:Class{hint}")
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError("task", name, f"cannot import {target}: {e}") from None
    return cls
