"""A finished run's model, read from its folder alone: what `dtrain.load` predicts with, a
distillation teacher, an EWC anchor.

A run's output folder holds everything that needs, and nothing in it runs code when read:
config.yaml (the task and its model's shape), model.safetensors (the weights) and
preprocessing.safetensors (what the task learned from its data: input statistics, a
vocabulary, the class count; `Task.preprocessing`). So the training data may be gone. A run
folder from elsewhere never brings code with it: its config.yaml may name only a task dtrain
ships unless `trust` says the run is yours (then its task module must be importable: installed,
on the Python path, or in the working directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection

from torch import nn

from dtrain.checkpoint import safeload
from dtrain.errors import ConfigError
from dtrain.protocols import BaseTask
from dtrain.tasks import TRUST_HINT, get_task, run_config

FOREIGN_TASK = "a recipe reads runs of its own task or of a task dtrain ships"
"""What a recipe that reads another run (a distillation teacher, an EWC anchor) is told."""


def open_run(
    run_dir: str | Path, trust: bool = False, key: str = "run", allowed: Collection[str] = (), hint: str = TRUST_HINT
) -> tuple[Any, BaseTask, nn.Module]:
    """(the run's config, its task, its model with the final weights in eval mode). `key`: the
    recipe key or argument that named the folder, for the one-line error. Untrusted, the run
    may name only a task dtrain ships or one of `allowed` (`hint` says what to do otherwise)."""
    run = Path(run_dir)
    for name in ("config.yaml", "model.safetensors"):
        if not (run / name).is_file():
            raise ConfigError(key, str(run), f"has no {name}: give the output_dir of a finished dtrain run")
    try:
        cfg = run_config(run / "config.yaml", trust, allowed, hint)
    except ConfigError as e:
        if e.key != "task" or "cannot import" not in e.expected:
            raise
        raise ConfigError(
            "task", e.value, f"{e.expected}; put the task module's folder on PYTHONPATH (or run from it)"
        ) from None
    task = get_task(cfg.task)(cfg)
    if (run / safeload.PREPROCESSING).is_file():
        task.load_preprocessing(safeload.load_weights(run / safeload.PREPROCESSING))
    task.from_run(run)
    model = task.inference_model()
    try:
        model.load_state_dict(safeload.load_weights(run / "model.safetensors"))
    except (RuntimeError, ValueError) as e:  # a file of another model, or damaged
        raise ConfigError(key, str(run), f"model.safetensors does not fit the task's model: {str(e)[:300]}") from None
    return cfg, task, model.eval()
