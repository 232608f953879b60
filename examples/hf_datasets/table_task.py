"""A task of your own on a table that Hugging Face `datasets` reads: `data.path` is a Parquet,
JSON Lines, CSV or Arrow file (or a folder of them, or a `save_to_disk` folder), opened
memory-mapped by `dtrain.data.tables` and read row by row through dtrain's sampler: sharded over the
ranks, resumed exactly mid-epoch, each row's augmentation drawn from its own random stream.
The columns are named by recipe keys. Needs the hf extra: pip install -e ".[hf]"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dtrain.config import Config, DataConfig, ModelConfig
from dtrain.data import tables
from dtrain.tasks import Task


@dataclass
class TableDataConfig(DataConfig):
    features_column: str = "pixels"
    """The column of 64 pixel values (an 8x8 image, 0-16)."""
    label_column: str = "digit"
    """The column of integer labels 0-9."""


@dataclass
class TableModelConfig(ModelConfig):
    hidden: int = 128
    """Width of the MLP's hidden layer."""


@dataclass
class TableConfig(Config):
    data: TableDataConfig = field(default_factory=TableDataConfig)
    model: TableModelConfig = field(default_factory=TableModelConfig)


class Sample:
    """A row as (pixels / 16, label): a picklable object, so loader workers can run it."""

    def __init__(self, features: str, label: str):
        self.features, self.label = features, label

    def __call__(self, row: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(row[self.features], dtype=torch.float32) / 16, torch.tensor(int(row[self.label]))


def jitter(sample: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Ink a little lighter or darker, plus pixel noise: every draw from the row's own stream
    (the same on any rank, in any loader worker, after any resume)."""
    x, y = sample
    scale = 0.8 + 0.4 * torch.rand((), generator=generator)
    return x * scale + 0.05 * torch.randn(x.shape, generator=generator), y


class DigitsTableTask(Task):
    config_class = TableConfig
    cfg: TableConfig

    def datasets(self) -> tuple[tables.Rows, tables.Rows]:
        d = self.cfg.data
        train, held_out = tables.open_splits(d.path, d.val_fraction)
        tables.columns(train, {"data.features_column": d.features_column, "data.label_column": d.label_column}, d.path)
        sample = Sample(d.features_column, d.label_column)
        return tables.Rows(train, sample), tables.Rows(held_out, sample)

    def augmentation(self) -> Any:
        return jitter if self.cfg.data.augment else None

    def build_model(self) -> nn.Module:
        h = self.cfg.model.hidden
        return nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, 10))

    def headline_metric(self) -> tuple[str, bool]:
        return "accuracy", True

    def output_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(outputs, batch[1])

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = model(x)
        return {
            "loss_sum": F.cross_entropy(logits, y, reduction="sum"),
            "correct": (logits.argmax(1) == y).sum(),
            "count": torch.tensor(len(y)),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["loss_sum"] / sums["count"], "accuracy": sums["correct"] / sums["count"]}
