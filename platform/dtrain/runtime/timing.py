"""Where a step's time goes: named regions of the step for the profiler (`region`), and the
throughput figures the loop logs (tokens/s, and MFU on a GPU of known peak).

A region is torch.profiler's `record_function` while a profiler records (`profile.enabled`,
`dtrain.features.profile`), and a shared null context otherwise: no cost when off.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

_NULL = contextlib.nullcontext()
_recording = False


def region(name: str) -> ContextManager[Any]:
    """A named part of the step in the profile (`dtrain.<name>`); nothing when not profiling."""
    return torch.profiler.record_function(f"dtrain.{name}") if _recording else _NULL


def record_regions(on: bool) -> None:
    """The profiler started (or stopped) recording on this rank."""
    global _recording
    _recording = on


def token_rates(
    tokens_per_sample: int,
    samples_per_s: float,
    flops_per_token: float,
    world_size: int,
    device: torch.device,
    peak_tflops: float = 0.0,
) -> dict[str, float]:
    """tokens/s of the job, and its MFU (model FLOPs utilisation: the FLOPs the model needs per
    second, per GPU, over the GPU's peak) where the peak is known."""
    if not tokens_per_sample:
        return {}
    out = {"tokens_per_s": samples_per_s * tokens_per_sample}
    peak = peak_tflops * 1e12 or (gpu_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else 0.0)
    if peak and flops_per_token:
        out["mfu"] = out["tokens_per_s"] / world_size * flops_per_token / peak
    return out


# Peak dense bf16 TFLOP/s of one GPU, for MFU (`model.peak_tflops` overrides).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}


def gpu_peak_flops(device_name: str) -> float:
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return 0.0
