"""`profile.*`: torch.profiler around training steps, on the chosen ranks.

The schedule is torch's (`wait`, `warmup`, `active`, `repeat`). Each recorded cycle writes
`output_dir/profile/trace_rank<R>_step<S>.json` (open in Perfetto or chrome://tracing) and
`ops_rank<R>.txt` (the top operators by self time); the run's summary gets the step-time
breakdown of the recorded steps, from the regions the step marks (`dtrain.runtime.timing.region`):
data loading, forward, backward, optimizer step, the time inside collectives (DDP's gradient
all-reduce, the CPU SyncBN's all-gathers, the loss all-reduce), and the CPU SyncBN's all-gathers
as a whole. Off, a region is a shared null context: no profiler, no record_function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from dtrain.config.schema import non_negative, positive
from dtrain.protocols import Feature, Run, StepOutput
from dtrain.runtime import distributed, timing


@dataclass
class ProfileConfig:
    enabled: bool = False
    """Profile training steps with torch.profiler: a Chrome/Perfetto trace and the top operators
    per profiled rank in output_dir/profile/ (and MLflow), a step-time breakdown in summary.json."""
    wait: int = 1
    """Steps skipped before each profiling cycle."""
    warmup: int = 1
    """Steps traced but discarded (the profiler's own start-up) before the recorded ones."""
    active: int = 3
    """Steps recorded per cycle."""
    repeat: int = 1
    """Cycles (each writes a trace)."""
    ranks: list[int] = field(default_factory=lambda: [0])
    """The ranks that profile; the others train unobserved."""
    record_shapes: bool = True
    """Record operator input shapes."""
    profile_memory: bool = True
    """Record tensor allocations."""
    memory_snapshot: bool = False
    """CUDA only: also record the allocator's history and dump a snapshot (pytorch.org/memory_viz)."""

    def validate(self) -> None:
        non_negative(self, "profile", "wait", "warmup")
        positive(self, "profile", "active", "repeat")


REGIONS = ("data", "forward", "backward", "optimizer")
SYNC_BN = ("AllGather", "AllGatherBackward")  # dtrain.engines.norm's autograd function, by its node names
COLLECTIVES = ("allreduce", "all_reduce", "allgather", "all_gather", "broadcast", "reduce_scatter", "nccl:", "gloo:")


class Profile(Feature):
    key, config_class, order = "profile", ProfileConfig, 80
    matrix = {"profile": ("profile.enabled=true", "profile.wait=0", "profile.warmup=0", "profile.active=1")}

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return bool(cfg.profile.enabled)

    def __init__(self, run: Run):
        self.cfg: ProfileConfig = run.cfg.profile
        self.folder, self.device = run.output_dir / "profile", run.device
        self.rank = distributed.rank()
        self.breakdown: dict[str, float] = {}
        self.prof: Any = None
        if self.rank not in self.cfg.ranks:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if run.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        c = self.cfg
        self.prof = torch.profiler.profile(
            activities=activities,
            record_shapes=c.record_shapes,
            profile_memory=c.profile_memory,
            schedule=torch.profiler.schedule(wait=c.wait, warmup=c.warmup, active=c.active, repeat=c.repeat),
            on_trace_ready=self._ready,
        )

    def setup(self, run: Run) -> None:
        if self.prof is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.cfg.memory_snapshot and self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.prof.__enter__()
        timing.record_regions(True)

    def after_step(self, run: Run, out: StepOutput) -> None:
        if self.prof is not None:
            self.prof.step()

    def end(self, run: Run, status: str) -> None:
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        timing.record_regions(False)
        prof.__exit__(None, None, None)
        if self.cfg.memory_snapshot and self.device.type == "cuda":
            torch.cuda.memory._dump_snapshot(str(self.folder / f"memory_rank{self.rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)

    def summary(self, run: Run) -> dict[str, Any]:
        """Each profiled rank's breakdown (collective), said at the end; the traces of the ranks
        on this machine go to MLflow with the run."""
        profiles = distributed.all_gather_object(self.breakdown)
        found = {str(r): p for r, p in enumerate(profiles) if p}
        for line in lines(found):
            run.say(line)
        for path in sorted(self.folder.glob("*")):
            run.log_file(path, "profile")
        return {"profile": found} if found else {}

    def _ready(self, prof: Any) -> None:
        trace = self.folder / f"trace_rank{self.rank}_step{prof.step_num}.json"
        prof.export_chrome_trace(str(trace))
        averages = prof.key_averages()
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        (self.folder / f"ops_rank{self.rank}.txt").write_text(averages.table(sort_by=sort, row_limit=30) + "\n")
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
        if e.key.startswith("dtrain.") and e.key[len("dtrain.") :] in REGIONS:
            out[f"{e.key[len('dtrain.') :]}_ms"] = e.cpu_time_total / 1e3 / steps
        elif e.key in SYNC_BN:
            sync_bn += e.cpu_time_total / 1e3 / steps
        elif any(c in name for c in COLLECTIVES):
            comm += e.self_cpu_time_total / 1e3 / steps
    out["collectives_ms"] = comm
    if sync_bn:
        out["sync_bn_ms"] = sync_bn  # the CPU SyncBN's all-gathers, forward and backward; their
        # collective calls are counted in collectives_ms too
    return out


def lines(found: dict[str, dict[str, float]]) -> list[str]:
    """Each profiled rank's breakdown, as the run's closing lines say it."""
    return [
        f"profile, rank {rank} (mean ms of CPU time per recorded step; the parts overlap): "
        + " ".join(f"{k.removesuffix('_ms')} {v:.3g}" for k, v in parts.items())
        for rank, parts in found.items()
    ]
