"""Predictions from a finished run: `dtrain.load(run_dir)` in Python, `dtrain predict` in a shell.

A run's output folder holds everything a prediction needs, and nothing in it runs code when
read: config.yaml (the task and its model's shape), model.safetensors (the weights) and
preprocessing.safetensors (what the task learned from its data: input statistics, a
vocabulary, the class count; `Task.preprocessing`). So the training data may be gone. The
task module must be importable (installed, on the Python path, or in the working directory):
a run folder from elsewhere never brings code with it unless `trust` says it is yours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dtrain.config import Config
from dtrain.errors import ConfigError
from dtrain.protocols import BaseTask
from dtrain.runtime.files import atomic_write
from dtrain.tasks.runs import open_run


@dataclass
class Predictor:
    """A trained model in eval mode with its task: `predictor(inputs)` is `task.predict`."""

    task: BaseTask
    model: nn.Module
    cfg: Config

    def __call__(self, inputs: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.task.predict(self.model, inputs)


def load(run_dir: str | Path, trust: bool = False, key: str = "run") -> Predictor:
    """The run's model (its final weights, model.safetensors) and its task's preprocessing.
    `key`: the recipe key or argument that named the folder, for the one-line error."""
    cfg, task, model = open_run(run_dir, trust, key)
    return Predictor(task, model, cfg)


def predict_file(run_dir: str | Path, inputs: Path, output: Path, batch_size: int, trust: bool = False) -> str:
    """`dtrain predict`: a .npy of inputs (read without pickles) -> a .npy of outputs, in
    batches; returns what was done, in one line."""
    predictor = load(run_dir, trust)
    try:
        x = np.load(inputs, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError("inputs", str(inputs), f"is not a readable .npy array of inputs ({e})") from None
    if x.ndim == 0 or len(x) == 0:
        raise ConfigError("inputs", str(inputs), "holds no samples: an array (N, ...) with N >= 1")
    try:
        text = x.dtype.kind in "US"  # an array of strings: texts, for a task that reads text
        out = torch.cat(
            [
                predictor([str(t) for t in x[i : i + batch_size]] if text else torch.from_numpy(x[i : i + batch_size]))
                for i in range(0, len(x), batch_size)
            ]
        )
    except (RuntimeError, ValueError, TypeError) as e:  # a shape or dtype the model does not take
        raise ConfigError(
            "inputs", f"{inputs} {x.dtype}{list(x.shape)}", f"the model cannot take these: {str(e)[:300]}"
        ) from None
    output.parent.mkdir(parents=True, exist_ok=True)
    array = out.cpu().numpy()

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.save would append .npy to a name
            np.save(f, array)

    atomic_write(output, write)
    return f"predict: {len(x)} inputs {list(x.shape[1:])} -> {output} {list(array.shape)} ({predictor.cfg.task})"
