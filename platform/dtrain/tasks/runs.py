"""A finished run's model, read from its folder alone: what `dtrain.load` predicts with, a
distillation teacher, an EWC anchor.

A run's output folder holds everything that needs, and nothing in it runs code when read:
config.yaml (the task and its model's shape), model.safetensors (the weights) and
preprocessing.safetensors (what the task learned from its data: input statistics, a
vocabulary, the class count; `Task.preprocessing`). So the training data may be gone. The
task module must be importable (installed, on the Python path, or in the working directory):
a run folder from elsewhere never brings code with it unless `trust` says it is yours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dtrain.checkpoint import safeload
from dtrain.errors import ConfigError
from dtrain.protocols import BaseTask
from dtrain.tasks import get_task, run_config


def open_run(run_dir: str | Path, trust: bool = False, key: str = "run") -> tuple[Any, BaseTask, nn.Module]:
    """(the run's config, its task, its model with the final weights in eval mode). `key`: the
    recipe key or argument that named the folder, for the one-line error."""
    run = Path(run_dir)
    for name in ("config.yaml", "model.safetensors"):
        if not (run / name).is_file():
            raise ConfigError(key, str(run), f"has no {name}: give the output_dir of a finished dtrain run")
    try:
        cfg = run_config(run / "config.yaml", beside=trust)
    except ConfigError as e:
        if e.key != "task" or "cannot import" not in e.expected:
            raise
        raise ConfigError(
            "task",
            e.value,
            f"{e.expected}; the task module is not in the run folder (its config.yaml "
            "never brings code): run from the module's folder, or put that folder on PYTHONPATH",
        ) from None
    task = get_task(cfg.task)(cfg)
    if (run / safeload.PREPROCESSING).is_file():
        task.load_preprocessing(safeload.load_weights(run / safeload.PREPROCESSING))
    model = task.inference_model()
    try:
        model.load_state_dict(safeload.load_weights(run / "model.safetensors"))
    except (RuntimeError, ValueError) as e:  # a file of another model, or damaged
        raise ConfigError(key, str(run), f"model.safetensors does not fit the task's model: {str(e)[:300]}") from None
    return cfg, task, model.eval()
