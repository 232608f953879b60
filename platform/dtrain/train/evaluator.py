"""Exact sharded evaluation of the weights training goes on from, when it is due (every
`train.eval_every_steps`, or at each epoch's end), and what the LR schedule learns from it."""

from __future__ import annotations

from typing import Any, Sized, cast

import torch
from torch.utils.data import DataLoader, Subset

from dtrain.checkpoint import store
from dtrain.config import Config
from dtrain.data import eval_loader
from dtrain.engines import evaluation_weights
from dtrain.protocols import BaseTask, Engine
from dtrain.runtime import distributed


class Evaluator:
    def __init__(
        self, cfg: Config, task: BaseTask, engines: dict[str, Engine], loader: DataLoader[Any], device: torch.device
    ):
        self.every = cfg.train.eval_every_steps
        self.task, self.engines, self.loader, self.device = task, engines, loader, device
        self.last: dict[str, float] = {}
        self.last_step = -1
        self._names: list[str] | None = None

    def due_after_step(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def due_at_epoch_end(self, step: int, total_steps: int) -> bool:
        return not self.every and step < total_steps  # the final evaluation follows the last step anyway

    def evaluate(self, loader: DataLoader[Any] | None = None) -> dict[str, float]:
        """Collective: the task's metrics of the whole evaluation set for the engines' weights
        (their buffers rank 0's: exactly what model.pt holds)."""
        for engine in self.engines.values():
            engine.sync_buffers()
        with evaluation_weights(self.engines):  # a schedule-free optimizer's average
            return self.task.evaluate(self.engines, loader or self.loader, self.device)

    def run(self, step: int) -> tuple[dict[str, float], list[str]]:
        """The evaluation at `step`, and the lines its plateau schedule says (an LR drop)."""
        self.last, self.last_step = self.evaluate(), step
        lines = []
        for name, engine in self.engines.items():  # optim.schedule=plateau: drop the LR on a plateau
            if engine.scheduler.observe(self.last):
                lines.append(
                    f"plateau: {'' if name == 'model' else name + ' '}lr scale "
                    f"{engine.scheduler.plateau['scale']:.4g} after step {step}"
                )
        return self.last, lines

    def metric_names(self) -> list[str]:
        """Collective: what an evaluation reports, from one evaluation batch per rank (cached), so a
        key naming a metric fails in seconds, not after a training run."""
        if self._names is None:
            ds, batch = self.loader.dataset, self.loader.batch_size or 1
            n = min(len(cast(Sized, ds)), batch * distributed.world_size())
            probe = eval_loader(Subset(ds, range(n)), batch, distributed.world_size(), distributed.rank(), 0)
            rng = store.rng_state()  # an evaluation may draw random numbers: training's streams stay as they were
            try:
                self._names = sorted(self.evaluate(probe))
            finally:
                store.set_rng_state(rng)
        return self._names


def metrics_line(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) >= 1 else f"{v:.4f}"
