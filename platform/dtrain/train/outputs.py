"""What a finished run leaves in its output_dir, and in MLflow: model.pt and
model.safetensors (the final weights), preprocessing.safetensors (what predictions need of the
data), summary.json, and the task's own artifacts."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from dtrain.checkpoint import safeload, store
from dtrain.config import Config
from dtrain.protocols import BaseTask, Engine, Tracker
from dtrain.runtime.files import atomic_write

log = logging.getLogger("dtrain")


def write_outputs(
    cfg: Config,
    task: BaseTask,
    engines: dict[str, Engine],
    weights: dict[str, torch.Tensor],
    summary: dict[str, Any],
    out_dir: Path,
    tracker: Tracker,
) -> None:
    model_path = out_dir / "model.pt"
    store.atomic_save(weights, model_path)
    safeload.save_weights(weights, out_dir / "model.safetensors")  # the file to share: loading it runs no code
    written = [out_dir / "config.yaml"]
    try:
        preprocessing = task.preprocessing()
    except (AttributeError, KeyError, TypeError) as e:  # a subclass whose datasets() set other attributes
        log.warning(
            "%s not written (task.preprocessing(): %s): dtrain.load needs it; the model is saved",
            safeload.PREPROCESSING,
            e,
        )
        preprocessing = {}
    if preprocessing:  # what `dtrain.load` needs besides the weights (input statistics, a vocabulary)
        written.append(out_dir / safeload.PREPROCESSING)
        safeload.save_weights(preprocessing, written[-1])
    summary_path = out_dir / "summary.json"
    atomic_write(summary_path, lambda p: p.write_text(json.dumps(summary, indent=2, default=float) + "\n"))
    tracker.log_metrics(
        {
            k: float(summary[k])
            for k in ("throughput", "train_time_s", "initial_loss", "final_loss")
            if isinstance(summary.get(k), (int, float))
        },
        summary["steps"],
    )
    for path in [*written, summary_path, *task.write_artifacts(out_dir, engines)]:
        tracker.log_artifact(path)
    if cfg.tracking.log_model:
        tracker.log_artifact(model_path)
