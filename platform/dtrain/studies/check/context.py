"""What every check gets (`Context`: the task, its data, fresh models) and returns (`Result`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from dtrain import data
from dtrain.config import Config
from dtrain.protocols import BaseTask
from dtrain.tasks import Task as SupervisedTask
from dtrain.train.fit import task_and_data

VERDICTS = ("PASS", "WARN", "FAIL", "SKIP")


@dataclass
class Result:
    """One line of the report (and of check.json)."""

    name: str
    """The check (`init_loss`) or a part of it (`data/duplicates`)."""
    verdict: str
    """PASS, WARN, FAIL or SKIP."""
    value: float | None
    """The number behind the verdict (None when there is none, e.g. SKIP)."""
    expected: str
    """What a healthy setup gives, in words and numbers."""
    detail: str = ""
    """What was measured and, when not PASS, the likely cause."""

    def value_text(self) -> str:
        if self.value is None:
            return "-"
        return f"{self.value:.4g}" if math.isfinite(self.value) else str(self.value)

    def as_dict(self) -> dict[str, Any]:
        value = self.value if self.value is None or math.isfinite(self.value) else str(self.value)
        return {
            "name": self.name,
            "verdict": self.verdict,
            "value": value,
            "expected": self.expected,
            "detail": self.detail,
        }


@dataclass
class Context:
    """The recipe's task and data, built alike on every rank, as training builds them."""

    cfg: Config
    task: BaseTask
    device: torch.device
    train_set: Dataset[Any]
    eval_set: Dataset[Any]
    loader: DataLoader[Any]
    """This rank's training loader (per-rank batch, sharded, shuffled as in training)."""
    plan: data.BatchPlan
    out_dir: Path
    _batches: list[Any] = field(default_factory=list)

    @classmethod
    def build(cls, cfg: Config, device: torch.device) -> Context:
        # In this process (no loader workers), without augmentation: the checks see the data as is.
        plan, task, train_set, eval_set, loader = task_and_data(cfg, num_workers=0, augment=False)
        return cls(cfg, task, device, train_set, eval_set, loader, plan, Path(cfg.output_dir))

    @property
    def supervised(self) -> bool:
        """A task with one model and a `loss` (the checks that train need one)."""
        return isinstance(self.task, SupervisedTask)

    def batches(self, n: int) -> list[Any]:
        """The first `n` training batches of this rank (epoch 0), on the device."""
        it = iter(self.loader)
        while len(self._batches) < n:
            try:
                self._batches.append(data.move(next(it), self.device))
            except StopIteration:
                it = iter(self.loader)
        return self._batches[:n]

    def eval_batches(self, n: int, size: int) -> list[Any]:
        loader = DataLoader(self.eval_set, batch_size=size, shuffle=False)
        out = []
        for batch in loader:
            out.append(data.move(batch, self.device))
            if len(out) == n:
                break
        return out

    def fresh_models(self) -> dict[str, nn.Module]:
        """The task's models as training initialises them (same seed), on the device."""
        torch.manual_seed(self.cfg.seed)
        return {name: spec.module.to(self.device) for name, spec in self.task.models().items()}

    def fresh_model(self) -> nn.Module:
        return self.fresh_models()["model"]

    def plot_path(self, name: str) -> Path:
        folder = self.out_dir / "check"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name


def skip(name: str, why: str) -> list[Result]:
    return [Result(name, "SKIP", None, "-", why)]


def no_dropout(model: nn.Module) -> nn.Module:
    """Training mode without dropout: a check that fits or compares needs a deterministic model."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return model
