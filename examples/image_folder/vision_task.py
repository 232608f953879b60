"""A torchvision model on a folder of images: `data.path` holds one sub-folder per class (or
`train/` and `val/` of them). Images are decoded lazily in DataLoader workers
(`data.decode: lazy`), augmented there with torchvision transforms on each sample's own random
stream (`dtrain.data.seeded`), and the model is any `torchvision.models` name (`model.arch`).
Needs torchvision: pip install -e ".[vision]"."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from dtrain.config import ConfigError
from dtrain.data import seeded
from dtrain.runtime import optional
from dtrain.tasks.cnn import CNNConfig, CNNModelConfig, CNNTask


@dataclass
class VisionModelConfig(CNNModelConfig):
    arch: str = "resnet18"
    """A torchvision.models name (torchvision.models.list_models()); trained from scratch."""


@dataclass
class VisionConfig(CNNConfig):
    model: VisionModelConfig = field(default_factory=VisionModelConfig)


def flip_and_crop(
    sample: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flip and a random crop after 4 pixels of zero padding, drawn from the
    sample's own stream (world-size invariant, exact on resume, any number of workers). Runs
    in worker processes, which start fresh (dtrain.data), hence the import here."""
    optional.torchvision("task", "vision_task:VisionTask")
    from torchvision.transforms import v2

    x, y = sample
    with seeded(generator):
        x = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomCrop(size, padding=4)])(x)
    return x, y


class VisionTask(CNNTask):
    config_class = VisionConfig
    cfg: VisionConfig

    def build_model(self) -> nn.Module:
        tv = optional.torchvision("task", "vision_task:VisionTask")
        if self.cfg.model.arch not in tv.models.list_models(module=tv.models):
            raise ConfigError(
                "model.arch",
                self.cfg.model.arch,
                "is not a torchvision classification model (e.g. resnet18, mobilenet_v3_small, efficientnet_b0)",
            )
        model: nn.Module = tv.models.get_model(self.cfg.model.arch, weights=None, num_classes=self.num_classes)
        return model

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        # ResNets' stages as FSDP2 units / compile and checkpoint regions; other models: one unit.
        return [m for n, m in model.named_children() if n.startswith("layer")]

    def augmentation(self) -> Any:
        return functools.partial(flip_and_crop, size=self.cfg.model.image_size) if self.cfg.data.augment else None
