"""Regression on a table: scikit-learn's bundled diabetes data (442 patients, 10 features, a
disease-progression score), an MLP, and metrics of the task's own (RMSE, MAE, R^2)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from dtrain.config import Config, ModelConfig
from dtrain.tasks import Task


@dataclass
class TabularModelConfig(ModelConfig):
    hidden: int = 64
    """Width of the two hidden layers."""
    dropout: float = 0.1
    """Dropout after each hidden layer."""


@dataclass
class TabularConfig(Config):
    model: TabularModelConfig = field(default_factory=TabularModelConfig)


class DiabetesTask(Task):
    config_class = TabularConfig
    cfg: TabularConfig

    def datasets(self) -> tuple[TensorDataset, TensorDataset]:
        from sklearn.datasets import load_diabetes
        from sklearn.model_selection import train_test_split

        x, y = load_diabetes(return_X_y=True)
        # A fixed split: every rank (and every run) holds out the same patients.
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=self.cfg.data.val_fraction, random_state=0)
        # Standardise with the training split's statistics; metrics are reported in the
        # target's own units, so keep its mean and scale.
        self.x_mean = torch.tensor(xtr.mean(0), dtype=torch.float32)
        self.x_std = torch.tensor(xtr.std(0), dtype=torch.float32)
        self.y_mean, self.y_std = float(ytr.mean()), float(ytr.std())

        def table(x: Any, y: Any) -> TensorDataset:
            return TensorDataset(
                (torch.tensor(x, dtype=torch.float32) - self.x_mean) / self.x_std,
                torch.tensor((y - self.y_mean) / self.y_std, dtype=torch.float32),
            )

        return table(xtr, ytr), table(xte, yte)

    def preprocessing(self) -> dict[str, torch.Tensor]:
        # What predict() needs besides the weights, saved with the run: the data may be gone.
        return {"x_mean": self.x_mean, "x_std": self.x_std, "y": torch.tensor([self.y_mean, self.y_std])}

    def load_preprocessing(self, state: dict[str, torch.Tensor]) -> None:
        self.x_mean, self.x_std = state["x_mean"], state["x_std"]
        self.y_mean, self.y_std = state["y"].tolist()

    def predict(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """Disease progression, in its own units, for raw clinical features (N, 10)."""
        x = (torch.as_tensor(inputs, dtype=torch.float32) - self.x_mean) / self.x_std
        out: torch.Tensor = model(x).squeeze(-1) * self.y_std + self.y_mean
        return out

    def build_model(self) -> nn.Module:
        h, p = self.cfg.model.hidden, self.cfg.model.dropout
        return nn.Sequential(
            nn.Linear(10, h), nn.ReLU(), nn.Dropout(p), nn.Linear(h, h), nn.ReLU(), nn.Dropout(p), nn.Linear(h, 1)
        )

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x).squeeze(-1), y)

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        # Sums, never means: dtrain adds them over batches and ranks, so the metrics below
        # are exact at any world size (a mean of per-rank R^2 would not be).
        x, y = batch
        pred = model(x).squeeze(-1).double() * self.y_std + self.y_mean
        target = y.double() * self.y_std + self.y_mean
        err = pred - target
        return {
            "sse": (err**2).sum(),
            "sae": err.abs().sum(),
            "y_sum": target.sum(),
            "y_sq": (target**2).sum(),
            "count": torch.tensor(len(y), dtype=torch.float64),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = sums["count"]
        total = sums["y_sq"] - sums["y_sum"] ** 2 / n  # the targets' sum of squares about their mean
        return {"rmse": math.sqrt(sums["sse"] / n), "mae": sums["sae"] / n, "r2": 1 - sums["sse"] / total}
