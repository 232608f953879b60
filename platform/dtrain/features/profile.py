"""`profile.enabled`: torch.profiler around training steps, on the chosen ranks.

The schedule is torch's (`wait`, `warmup`, `active`, `repeat`). Each recorded cycle writes
`output_dir/profile/trace_rank<R>_step<S>.json` (open in Perfetto or chrome://tracing) and
`ops_rank<R>.txt` (the top operators by self time); the run's summary gets the step-time
breakdown of the recorded steps, from the regions the step marks (`region`): data loading,
forward, backward, optimizer step, the time inside collectives (DDP's gradient all-reduce, the CPU
SyncBN's all-gathers, the loss all-reduce), and the CPU SyncBN's all-gathers as a whole. Off, a region is a shared null context:
no profiler, no record_function.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, ContextManager

import torch

from dtrain.runtime import distributed
from dtrain.config import ProfileConfig

REGIONS = ("data", "forward", "backward", "optimizer")
SYNC_BN = ("AllGather", "AllGatherBackward")  # dtrain.engines.norm's autograd function, by its node names
COLLECTIVES = ("allreduce", "all_reduce", "allgather", "all_gather", "broadcast", "reduce_scatter", "nccl:", "gloo:")
_NULL = contextlib.nullcontext()
_active = False


def region(name: str) -> ContextManager[Any]:
    """A named part of the step in the profile (`dtrain.<name>`); nothing when not profiling."""
    return torch.profiler.record_function(f"dtrain.{name}") if _active else _NULL


class Profiler:
    def __init__(self, cfg: ProfileConfig, out_dir: Path, device: torch.device):
        self.cfg, self.folder, self.device = cfg, out_dir / "profile", device
        self.rank = distributed.rank()
        self.files: list[Path] = []
        self.breakdown: dict[str, float] = {}
        self.prof: Any = None
        if not cfg.enabled or self.rank not in cfg.ranks:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=activities, record_shapes=cfg.record_shapes, profile_memory=cfg.profile_memory,
            schedule=torch.profiler.schedule(wait=cfg.wait, warmup=cfg.warmup, active=cfg.active, repeat=cfg.repeat),
            on_trace_ready=self._ready)

    def __enter__(self) -> Profiler:
        global _active
        if self.prof is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.cfg.memory_snapshot and self.device.type == "cuda":
                torch.cuda.memory._record_memory_history(max_entries=100_000)
            self.prof.__enter__()
            _active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        global _active
        if self.prof is None:
            return
        _active = False
        self.prof.__exit__(*exc)
        if self.cfg.memory_snapshot and self.device.type == "cuda":
            path = self.folder / f"memory_rank{self.rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.files.append(path)

    def step(self) -> None:
        """After each training step: advances the profiler's schedule."""
        if self.prof is not None:
            self.prof.step()

    def _ready(self, prof: Any) -> None:
        trace = self.folder / f"trace_rank{self.rank}_step{prof.step_num}.json"
        prof.export_chrome_trace(str(trace))
        averages = prof.key_averages()
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self.folder / f"ops_rank{self.rank}.txt"
        table.write_text(averages.table(sort_by=sort, row_limit=30) + "\n")
        self.files += [trace, table]
        self.breakdown = breakdown(averages, self.cfg.active)
        (self.folder / f"breakdown_rank{self.rank}.json").write_text(json.dumps(self.breakdown, indent=2) + "\n")


def breakdown(averages: Any, steps: int) -> dict[str, float]:
    """Mean milliseconds of CPU time per recorded step (on a GPU the kernels overlap the CPU, and
    the trace shows how). The parts overlap, they do not add up: `forward_ms` and `backward_ms`
    contain `sync_bn_ms` and the collectives called inside them; `sync_bn_ms` is the whole of
    the CPU SyncBN's all-gathers (forward and backward), a wait for a slower rank included;
    `collectives_ms` is the collective ops' own time (their launch and copies: a wait for another
    rank is counted where it happens, e.g. in `sync_bn_ms`), so it can be the smaller of the two."""
    out: dict[str, float] = {}
    comm = sync_bn = 0.0
    for e in averages:
        name = e.key.lower()
        if e.key.startswith("dtrain.") and e.key[len("dtrain."):] in REGIONS:
            out[f"{e.key[len('dtrain.'):]}_ms"] = e.cpu_time_total / 1e3 / steps
        elif e.key in SYNC_BN:
            sync_bn += e.cpu_time_total / 1e3 / steps
        elif any(c in name for c in COLLECTIVES):
            comm += e.self_cpu_time_total / 1e3 / steps
    out["collectives_ms"] = comm
    if sync_bn:
        out["sync_bn_ms"] = sync_bn  # the CPU SyncBN's all-gathers, forward and backward; their
        # collective calls are counted in collectives_ms too
    return out


def token_rates(tokens_per_sample: int, samples_per_s: float, flops_per_token: float, world_size: int,
                device: torch.device, peak_tflops: float = 0.0) -> dict[str, float]:
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
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}


def gpu_peak_flops(device_name: str) -> float:
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return 0.0
