"""Image classification with a small ResNet-style CNN (BatchNorm, residual blocks).

Data: scikit-learn's 8x8 digits by default; `data.path` may point at a CIFAR-10 python
folder or an image folder. See `dtrain.data.images`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from dtrain import data
from dtrain.config import Config, DataConfig, ModelConfig
from dtrain.data import images
from dtrain.errors import ConfigError
from dtrain.tasks import Task


@dataclass
class CNNModelConfig(ModelConfig):
    widths: list[int] = field(default_factory=lambda: [32, 64])
    """Channels of each stage; every stage after the first halves the resolution."""
    blocks_per_stage: int = 2
    """Residual blocks per stage."""
    image_size: int = 32
    """Image folders are resized to this (digits are 8x8, CIFAR-10 32x32)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    dropout: float = 0.0
    """Dropout before the classifier."""
    zero_init_residual: bool = True
    """Zero-init the last BatchNorm of each residual branch: every block starts as the identity,
    which makes large-batch training with the linear rule stable (Goyal et al. 2017)."""
    prior_bias: bool = False
    """Start the classifier's bias at log(class frequency) of the training set, so the initial
    prediction is the prior rather than uniform (helps on imbalanced classes)."""


@dataclass
class ImageDataConfig(DataConfig):
    decode: Literal["memory", "lazy"] = "memory"
    """Image folders: decode every image into memory at start (small sets), or each one when the
    loader asks for it, in the data.num_workers DataLoader processes (sets larger than RAM)."""
    classes: list[int] = field(default_factory=list)
    """Train and evaluate on these labels only, the softmax taken over them (one head per subset
    of classes, as in task-incremental learning: a run on 0-4, then one on 5-9 with ewc.from).
    The model keeps an output for every label of the data. Empty: all."""


@dataclass
class CNNConfig(Config):
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: CNNModelConfig = field(default_factory=CNNModelConfig)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, widths: list[int], blocks: int, dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch: every block starts as identity,
        # which makes large-batch training with the linear rule stable (Goyal et al. 2017).
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        logits: torch.Tensor = self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))
        return logits


def _only(ds: Dataset[Any], labels: torch.Tensor) -> Dataset[Any]:
    """The samples of `ds` whose label is one of `labels`."""
    y = ds.labels if isinstance(ds, images.ImageFiles) else cast(TensorDataset, ds).tensors[1]
    return Subset(ds, torch.isin(torch.as_tensor(y), labels).nonzero().flatten().tolist())


def random_shift(
    sample: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator, max_shift: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Translate one (C, H, W) image by up to `max_shift` pixels each way (zero padding), the
    offsets drawn from the sample's own generator (see `Task.augmentation`)."""
    x, y = sample
    s = max_shift
    dy, dx = torch.randint(0, 2 * s + 1, (2,), generator=generator).tolist()
    h, w = x.shape[-2:]
    return F.pad(x, (s, s, s, s))[..., dy : dy + h, dx : dx + w], y


class CNNTask(Task):
    config_class = CNNConfig
    cfg: CNNConfig
    # The inputs' standardisation, for predictions: set by `datasets()` from the training split;
    # a subclass with datasets of its own that standardise sets them too (else: none).
    mean: torch.Tensor = torch.zeros(1, 1, 1)
    std: torch.Tensor = torch.ones(1, 1, 1)

    def headline_metric(self) -> tuple[str, bool]:
        return "accuracy", True

    def datasets(self) -> tuple[Dataset[Any], Dataset[Any]]:
        d = self.cfg.data
        lazy = getattr(d, "decode", "memory") == "lazy"  # (a subclass's config may keep the plain DataConfig)
        train, test = images.load_images(d.path, self.cfg.model.image_size, d.val_fraction, lazy)
        if isinstance(train, images.ImageFiles):
            self.in_channels, y = train.channels, train.labels
        else:
            self.in_channels, y = cast(TensorDataset, train).tensors[0].shape[1], cast(TensorDataset, train).tensors[1]
        self.num_classes = int(y.max()) + 1
        self.class_counts = torch.bincount(y, minlength=self.num_classes)
        standardised = cast("images.Images | images.ImageFiles", train)  # both keep their statistics
        self.mean, self.std = standardised.mean, standardised.std
        self.subset = self._subset(getattr(d, "classes", []))
        if self.subset is not None:
            train, test = (_only(ds, self.subset) for ds in (train, test))
        return train, test

    def preprocessing(self) -> dict[str, torch.Tensor]:
        return {
            "mean": self.mean,
            "std": self.std,
            "classes": torch.tensor(self.num_classes),
            "channels": torch.tensor(self.in_channels),
        }

    def load_preprocessing(self, state: dict[str, torch.Tensor]) -> None:
        self.mean, self.std = state["mean"], state["std"]
        self.num_classes, self.in_channels = int(state["classes"]), int(state["channels"])

    def predict(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """Class probabilities (N, classes) for images (N, C, H, W) at model.image_size, with
        pixels as the data source holds them (digits and image folders: [0, 1]; CIFAR-10's
        batches: 0-255), standardised with the training split's statistics."""
        x = torch.as_tensor(inputs, dtype=torch.float32)
        return F.softmax(model((x - self.mean) / self.std).float(), dim=1)

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        return ResNet(self.in_channels, self.num_classes, m.widths, m.blocks_per_stage, m.dropout)

    def init_weights(self, model: nn.Module) -> None:
        if not isinstance(model, ResNet):
            return  # a subclass's own model
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, BasicBlock):
                    m.bn2.weight.fill_(0.0 if self.cfg.model.zero_init_residual else 1.0)
            if self.cfg.model.prior_bias:
                model.fc.bias.copy_(torch.log(self.class_counts.clamp(min=1) / self.class_counts.sum()))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        # The residual blocks; the stem and the head join the root; a subclass's own model has none.
        return list(model.layers) if isinstance(model, ResNet) else []

    def augmentation(self) -> data.Augment | None:
        return random_shift if self.cfg.data.augment else None

    subset: torch.Tensor | None = None
    """With `data.classes`: the labels trained on, in order (the outputs' columns)."""

    def _subset(self, classes: list[int]) -> torch.Tensor | None:
        if not classes:
            return None
        if sorted(set(classes)) != sorted(classes) or not all(0 <= c < self.num_classes for c in classes):
            raise ConfigError(
                "data.classes", classes, f"must be distinct labels of the data, 0..{self.num_classes - 1}"
            )
        return torch.tensor(classes)

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        logits: torch.Tensor = model(batch[0])
        return logits if self.subset is None else logits[:, self.subset.to(logits.device)]

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        """Labels as columns of `outputs` (their place in data.classes)."""
        if self.subset is None:
            return y
        column = torch.full((self.num_classes,), -1, dtype=torch.long)
        column[self.subset] = torch.arange(len(self.subset))
        return column.to(y.device)[y]

    def output_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(outputs, self._targets(batch[1]), label_smoothing=self.cfg.model.label_smoothing)

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        logits, y = self.outputs(model, batch), self._targets(y)
        return {
            "loss_sum": F.cross_entropy(logits.float(), y, reduction="sum"),
            "correct": (logits.argmax(1) == y).sum(),
            "count": torch.tensor(len(y), device=y.device),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {
            "loss": sums["loss_sum"] / sums["count"],
            "accuracy": sums["correct"] / sums["count"],
            "samples": sums["count"],
        }
