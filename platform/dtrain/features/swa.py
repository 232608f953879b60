"""`swa.*`: stochastic weight averaging (Izmailov et al. 2018): from `swa.start_step` on, the
equal-weight average of the weights after every `swa.every_steps` steps; at the end its
BatchNorm statistics are computed again on training batches (an average of weights is a new
network, whose activations the averaged statistics do not describe), and model.pt holds it.

The average and its count come from torch's `swa_utils` (`get_swa_multi_avg_fn`, the running
mean; `update_bn`, the statistics); they live in the same kind of tensors as the weights (a
DTensor shard under FSDP2) and are checkpointed with DCP (`swa/`), so a run resumes to the
same average on any world size. Evaluations after the start also evaluate the average
(`eval_swa`, with its averaged statistics until the end). SWA is usually run with a constant or
cyclic learning rate over its steps (`optim.schedule=constant` or `cosine_restarts`).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import get_swa_multi_avg_fn, update_bn

from dtrain.config.schema import non_negative, positive
from dtrain.data import move, start
from dtrain.errors import ConfigError
from dtrain.features.ema import Average, evaluate_average, keep_average
from dtrain.protocols import Feature, Run, StepOutput
from dtrain.runtime import distributed


@dataclass
class SWAConfig:
    start_step: int = 0
    """The first step whose weights join the average (e.g. three quarters into the run). 0: off."""
    every_steps: int = 1
    """Average the weights after every this many steps from `swa.start_step`."""
    bn_batches: int = 100
    """Training batches (per rank) the average's BatchNorm statistics are computed on at the end;
    0: keep the averaged statistics."""
    save: bool = True
    """model.pt holds the average (else the last weights; the average is still evaluated)."""

    def validate(self) -> None:
        non_negative(self, "swa", "start_step", "bn_batches")
        positive(self, "swa", "every_steps")


class SWA(Feature):
    key, config_class, order, folder_state = "swa", SWAConfig, 45, True
    requires = {
        "weights": "its module holds no whole parameters to average (ZeRO-3 partitions them); "
        "use deepspeed.zero_stage 0-2, or engine=ddp or fsdp",
        "supervised": "it feeds training batches to one model to compute its BatchNorm statistics (a GAN "
        "averages its generator itself: gan.ema_decay)",
    }
    matrix = {"swa": ("swa.start_step=1", "swa.bn_batches=2")}

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return bool(cfg.swa.start_step)

    @classmethod
    def switch(cls, cfg: Any) -> tuple[str, Any]:
        return "swa.start_step", cfg.swa.start_step

    @classmethod
    def check(cls, cfg: Any) -> None:
        if not cfg.swa.save:
            return
        for key, on in (
            ("ema.save", getattr(getattr(cfg, "ema", None), "save", False) and cfg.ema.decay),
            ("prune.amount", getattr(getattr(cfg, "prune", None), "amount", 0)),
        ):
            if on:
                raise ConfigError(
                    "swa.save",
                    True,
                    f"not with {key}: model.pt holds one set of weights, and "
                    + ("the EMA's is the other" if key == "ema.save" else "an average is not sparse"),
                )

    def __init__(self, run: Run):
        self.cfg: SWAConfig = run.cfg.swa
        self.average = Average(run.engines)
        self.last: dict[str, float] = {}

    def describe(self) -> str:
        return f"swa: average of the weights every {self.cfg.every_steps} step(s) from step {self.cfg.start_step}" + (
            ", model.pt holds it" if self.cfg.save else ""
        )

    def after_step(self, run: Run, out: StepOutput) -> None:
        c = self.cfg
        if out.stepped and run.step >= c.start_step and (run.step - c.start_step) % c.every_steps == 0:
            self.average.update(get_swa_multi_avg_fn())

    def after_eval(self, run: Run, metrics: dict[str, float]) -> None:
        if self.average.updates:
            self.last = evaluate_average(run, self.average, "eval_swa")

    def end(self, run: Run, status: str) -> None:
        if status != "finished" or not self.average.updates:
            return
        if self.cfg.bn_batches:
            self._recompute_batch_norms(run)
        if self.cfg.save:
            keep_average(run, self.average)
            run.say(
                f"swa: model.pt holds the average of {self.average.updates} steps' weights"
                + (f", BatchNorm statistics from {self.cfg.bn_batches} batches" if self.cfg.bn_batches else "")
            )

    @torch.no_grad()
    def _recompute_batch_norms(self, run: Run) -> None:
        """The average's BatchNorm statistics from training batches (torch's `update_bn`: each
        BatchNorm's cumulative mean over the batches), the mean of the ranks' (rank 0's under
        synchronised BatchNorm, which computes them over the global batch)."""
        with self.average.swapped():
            batches = islice(start(run.train_loader), self.cfg.bn_batches)
            for engine in run.engines.values():
                inputs = (
                    run.task.check_inputs({"model": engine.module}, move(b, run.device)).get("model") for b in batches
                )
                update_bn((x for x in inputs if x is not None), engine.module)
                for buffer in engine.module.buffers():
                    if buffer.is_floating_point():
                        buffer.copy_(distributed.all_reduce_mean(buffer.detach().clone()))
            fresh = {k: t.detach().float().clone() for k, t in self.average.live.items()}
        for k, t in fresh.items():  # the recomputed statistics become the average's
            if k.split(".")[-1] in ("running_mean", "running_var"):
                self.average.shadow[k] = t

    def summary(self, run: Run) -> dict[str, Any]:
        return {"swa": {"eval": self.last, "averaged_steps": self.average.updates, "start_step": self.cfg.start_step}}

    def save(self, folder: Path, background: bool = False) -> Future[Any] | None:
        self.average.save(folder)
        return None

    def load(self, folder: Path) -> None:
        self.average.load(folder, "swa.start_step")
