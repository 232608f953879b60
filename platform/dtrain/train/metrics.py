"""Per-rank sums of the step outputs between two logs, reduced across ranks when logged."""

from __future__ import annotations

import time

import torch

from dtrain.protocols import StepOutput
from dtrain.runtime import distributed


class MetricsWindow:
    """Per-rank sums of the step outputs since the last log; reduced across ranks when logged."""

    def __init__(self, log_every: int):
        self.log_every = log_every
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = self.samples = 0
        self.t0 = time.perf_counter()

    def add(self, out: StepOutput, samples: int) -> None:
        for k, v in {"loss": out.loss, **out.metrics}.items():
            v = v.detach().double()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1
        self.samples += samples

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.log_every == 0 or step == total_steps

    def pause(self, seconds: float) -> None:
        """Time spent on evaluation or checkpoints is not training time."""
        self.t0 += seconds

    def reduce(self) -> tuple[dict[str, float], float, float]:
        """(ranks' mean of each windowed value, samples/s, seconds); one all-reduce for all."""
        keys = sorted(self.sums)
        means = (distributed.all_reduce_mean(torch.stack([self.sums[k] for k in keys])) / self.steps).tolist()
        seconds = time.perf_counter() - self.t0
        return dict(zip(keys, means)), self.samples / max(seconds, 1e-9), seconds
