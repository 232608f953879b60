"""Mixed precision as one object per job: the autocast context and, under fp16, the
GradScaler shared by every engine it scales (one `update()` per training iteration)."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class AmpPrecision:
    """torch.amp: autocast for forward; fp16 adds loss scaling (bf16 has fp32's exponent range
    and needs none). `loss_scaling=False` for engines that scale on their own (DeepSpeed)."""

    def __init__(self, name: str, device: torch.device, loss_scaling: bool = True):
        self.name, self.device = name, device
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16" and loss_scaling)

    def autocast(self) -> ContextManager[Any]:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.name])

    def update(self) -> None:
        if self.scaler.is_enabled():
            self.scaler.update()
