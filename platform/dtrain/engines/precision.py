"""Mixed precision as one object per job: the autocast context and, under fp16, the
GradScaler shared by every engine it scales (one `update()` per training iteration)."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class AmpPrecision:
    """torch.amp: autocast for forward; fp16 adds loss scaling (bf16 has fp32's exponent range
    and needs none). `loss_scaling=False` for engines that scale on their own (DeepSpeed);
    `autocast=False` for engines that cast the parameters themselves (FSDP2's policy)."""

    def __init__(self, name: str, device: torch.device, loss_scaling: bool = True, autocast: bool = True):
        self.name, self.device, self.casts = name, device, autocast
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16" and loss_scaling)

    def autocast(self) -> ContextManager[Any]:
        if self.name == "fp32" or not self.casts:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.name])

    def update(self) -> None:
        if self.scaler.is_enabled():
            self.scaler.update()


def set_fp32_matmuls(allow_tf32: bool, device: torch.device) -> str | None:
    """Let fp32 matmuls and convolutions use TF32 tensor cores (CUDA, Ampere and newer) or
    keep them IEEE fp32. Returns the mode for the start line (None off CUDA)."""
    if device.type != "cuda":
        return None
    mode = tf32_mode(allow_tf32, torch.cuda.get_device_capability(device))
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode  # type: ignore[attr-defined]  # (untyped in torch's stubs)
    return mode


def tf32_mode(allow_tf32: bool, capability: tuple[int, int]) -> str:
    """ "tf32" where asked and the GPU has TF32 (compute capability 8.0+), else "ieee"."""
    return "tf32" if allow_tf32 and capability >= (8, 0) else "ieee"
