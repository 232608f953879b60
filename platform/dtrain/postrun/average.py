"""`dtrain average CKPT... --output model.pt`: the uniform average of several checkpoints of
one run (weight averaging, as in "checkpoint averaging" for Transformers and SWA's uniform
mean), then BatchNorm statistics recomputed on training data for the averaged weights
(`torch.optim.swa_utils.update_bn`): averaged running statistics do not belong to averaged
weights. Reads any engine's checkpoints (DDP, DeepSpeed, FSDP2), in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from dtrain import checkpoint, data, engines
from dtrain.checkpoint import safeload
from dtrain.config import Config
from dtrain.errors import ConfigError
from dtrain.protocols import BaseTask
from dtrain.tasks import get_task
from dtrain.train.config import load_config


def uniform_average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Floating tensors averaged (in float64, then back to their dtype); counters from the last."""
    out = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            out[key] = (sum(s[key].double() for s in states) / len(states)).to(last.dtype)  # type: ignore[union-attr]
        else:
            out[key] = last.clone()
    return out


def average(folders: list[Path], output: Path, bn_batches: int, trust: bool = False) -> tuple[Config, dict[str, float]]:
    """Average the checkpoints, refresh BatchNorm statistics, write `output`; returns the run's
    config and the averaged model's eval metrics."""
    runs = {f.resolve().parent.parent for f in folders}
    if len(runs) != 1:
        raise ConfigError(
            "checkpoints",
            " ".join(map(str, folders)),
            "must be checkpoints of one run (step_* folders under the same output_dir/checkpoints)",
        )
    for f in folders:
        if not (f / checkpoint.TRAINER).exists():
            raise ConfigError("checkpoint", str(f), "is not a checkpoint folder (a step_* folder with trainer.pt)")
    cfg = load_config(runs.pop() / "config.yaml", ["tracking.enabled=false"], trust=trust)
    task = get_task(cfg.task)(cfg)
    train_ds, eval_ds = task.datasets()
    specs = task.models()
    if list(specs) != ["model"]:
        raise ConfigError(
            "task",
            cfg.task,
            f"has {len(specs)} models; average takes a one-model task "
            "(a GAN averages its generator with gan.ema_decay)",
        )
    model = specs["model"].module
    engine = engines.engine_class(cfg.engine)  # each engine reads its own checkpoint format
    model.load_state_dict(uniform_average([engine.read_weights(f / "model", model, trust) for f in folders]))
    refresh_bn(model, train_ds, cfg, bn_batches)
    if output.suffix == ".safetensors":
        safeload.save_weights(model.state_dict(), output)
    else:
        checkpoint.atomic_save(model.state_dict(), output)
    return cfg, evaluate_model(task, model, eval_ds, cfg.data.eval_batch_size)


def refresh_bn(model: nn.Module, train_ds: Any, cfg: Config, batches: int) -> None:
    """BatchNorm running statistics recomputed for the weights `model` holds, on `batches`
    seeded training batches (nothing without BatchNorm, or with `batches` 0)."""
    if batches and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        loader = DataLoader(
            train_ds,
            batch_size=cfg.data.eval_batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        torch.optim.swa_utils.update_bn(first_batches(loader, batches), model)


def first_batches(loader: DataLoader[Any], n: int) -> list[Any]:
    batches: list[Any] = []
    for batch in loader:
        if len(batches) == n:
            break
        batches.append(batch)
    return batches


@torch.no_grad()
def evaluate_model(task: BaseTask, model: nn.Module, eval_ds: Any, batch_size: int) -> dict[str, float]:
    """The task's eval metrics of `model` in this process (sums over the whole set)."""
    eval_sums, eval_metrics = getattr(task, "eval_sums", None), getattr(task, "eval_metrics", None)
    if eval_sums is None or eval_metrics is None:
        return {}
    model.eval()
    sums: dict[str, float] = {}
    for batch in DataLoader(eval_ds, batch_size=batch_size):
        for k, v in eval_sums(model, data.move(batch, torch.device("cpu"))).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    metrics: dict[str, float] = eval_metrics(sums)
    return metrics
