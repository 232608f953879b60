"""`ema.*`: an exponential moving average of the weights, for every supervised task and engine.

A shadow copy of each engine's parameters and floating buffers (BatchNorm statistics too, as
torchvision's reference scripts average them) is pulled towards the live weights after every
optimizer step that stepped:  shadow <- decay * shadow + (1 - decay) * live  (torch's
`swa_utils.get_ema_multi_avg_fn`). Evaluation runs a second time on the shadow (`eval_ema`
in MLflow and summary.json); `ema.save` makes model.pt the shadow.

The decay is stated, like `optim.lr`, for a reference global batch (`ema.base_batch_size`):
at another batch the per-step decay is decay ** (global / base), so the average spans the
same number of samples whatever the batch. `ema.warmup` uses min(decay, (1 + n) / (10 + n))
after n updates (TensorFlow's `num_updates`, timm's warmup), so the random initial weights
are forgotten within the first few hundred steps.

The shadow is the same kind of tensor as the weight it follows (under FSDP2 a DTensor shard),
so an update is local and costs no communication; it is checkpointed with DCP beside the
engines (`ema/`), so it resumes exactly, on another world size too. `Average` is that shadow,
for any averaging rule (`dtrain.features.swa` averages the same way).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from dtrain.config.schema import non_negative, require
from dtrain.errors import CheckpointError
from dtrain.protocols import Engine, Feature, Run, StepOutput
from dtrain.runtime import distributed

log = logging.getLogger("dtrain")


@dataclass
class EMAConfig:
    decay: float = 0.0
    """Per-step decay of an exponential moving average of the weights at a global batch of
    `ema.base_batch_size` (e.g. 0.999); evaluated beside the raw weights (`eval_ema`). 0: off."""
    base_batch_size: int = 0
    """The global batch `ema.decay` is stated for; at another batch the per-step decay is
    decay ** (global / base), so the average spans the same samples. 0: optim.base_batch_size."""
    warmup: bool = False
    """Use min(decay, (1 + n) / (10 + n)) after n updates, forgetting the initial weights fast."""
    save: bool = False
    """model.pt holds the average instead of the raw weights."""

    def validate(self) -> None:
        require("ema.decay", self.decay, 0 <= self.decay < 1, "must be in [0, 1) (0: off)")
        non_negative(self, "ema", "base_batch_size")


MultiAvg = Callable[[list[torch.Tensor], list[torch.Tensor], Any], None]
"""torch.optim.swa_utils' in-place rule: (averages, live tensors, number of updates so far)."""


class Average:
    """An average of the engines' floating parameters and buffers, each the same kind of tensor
    as the one it follows (a DTensor shard under FSDP2): updated locally, checkpointed with DCP."""

    def __init__(self, engines: dict[str, Engine]):
        self.live: dict[str, torch.Tensor] = {}
        self.modules = [engine.module for engine in engines.values()]
        for name, engine in engines.items():
            for key, t in [*engine.module.named_parameters(), *engine.module.named_buffers()]:
                if t.is_floating_point():
                    self.live[f"{name}.{key}"] = t
        self.shadow = self.copy_of_live()
        self.updates = 0

    def copy_of_live(self) -> dict[str, torch.Tensor]:
        return {k: t.detach().float().clone() for k, t in self.live.items()}

    @torch.no_grad()
    def update(self, rule: MultiAvg) -> None:
        # One foreach call per kind of tensor: under FSDP2 the parameters are DTensor shards and
        # the BatchNorm buffers plain tensors, which one foreach op may not mix.
        for sharded in (True, False):
            keys = [k for k, t in self.live.items() if distributed.is_sharded(t) == sharded]
            if keys:
                live = [
                    self.live[k].detach() if self.live[k].dtype == torch.float32 else self.live[k].detach().float()
                    for k in keys
                ]
                rule([self.shadow[k] for k in keys], live, self.updates)
        self.updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped(self) -> Iterator[None]:
        """Inside: the models hold the average (evaluation); after: the live weights."""
        saved = {k: t.detach().clone() for k, t in self.live.items()}
        try:
            self.copy_in()
            yield
        finally:
            self._reshard()
            for k, t in self.live.items():
                t.copy_(saved[k])

    @torch.no_grad()
    def copy_in(self) -> None:
        """The models hold the average from now on (a finished run's model.pt)."""
        self._reshard()
        for k, t in self.live.items():
            t.copy_(self.shadow[k])

    def _reshard(self) -> None:
        """FSDP2 keeps the parameters a forward all-gathered (the root's always, with
        `reshard_after_forward=False`) and computes the next forward with them: only the shards
        are swapped here, so every module is resharded first, and its next forward gathers
        what the shards hold."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.modules:
            for m in module.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    def _state(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "updates": torch.tensor(self.updates)}

    def save(self, folder: Path) -> None:
        """Collective (DCP): replicated averages are written once, shards by their ranks."""
        from torch.distributed.checkpoint import state_dict_saver

        with _single_process_is_intended():
            state_dict_saver.save(self._state(), checkpoint_id=folder, no_dist=not torch.distributed.is_initialized())

    def load(self, folder: Path, what: str) -> None:
        if not folder.exists():
            log.warning(
                "resume: %s has no %s/ (written before %s was on); the average starts from the loaded weights",
                folder.parent.name,
                folder.name,
                what,
            )
            self.shadow, self.updates = self.copy_of_live(), 0
            return
        from dtrain.checkpoint import dcp

        state = self._state()
        try:
            with _single_process_is_intended():
                dcp.dcp_load(state, folder, no_dist=not torch.distributed.is_initialized())
        except Exception as e:  # a truncated shard, a crafted file: the checkpoint is skipped like any broken one
            raise CheckpointError(f"cannot load {folder}: {dcp.first_cause(e)}") from None
        self.updates = int(state["updates"])


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    # DCP warns on every call without a process group; one process without one is a normal run.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def evaluate_average(run: Run, average: Average, prefix: str) -> dict[str, float]:
    """Collective: the task's evaluation of `average`, logged as `<prefix>/...` and said."""
    with average.swapped():
        for engine in run.engines.values():
            engine.sync_buffers()  # the averaged BatchNorm statistics: rank 0's, as model.pt holds
        metrics = run.evaluate()
    run.report_eval(prefix, metrics)
    return metrics


def keep_average(run: Run, average: Average) -> None:
    """model.pt holds the average: the models take it for good (training is over)."""
    average.copy_in()
    for engine in run.engines.values():
        engine.sync_buffers()


class EMA(Feature):
    key, config_class, order, folder_state = "ema", EMAConfig, 40, True
    requires = {
        "weights": "its module holds no whole parameters to average (ZeRO-3 partitions them); "
        "use deepspeed.zero_stage 0-2, or engine=ddp or fsdp"
    }
    matrix = {"ema": ("ema.decay=0.9",)}

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return bool(cfg.ema.decay)

    @classmethod
    def switch(cls, cfg: Any) -> tuple[str, Any]:
        return "ema.decay", cfg.ema.decay

    def __init__(self, run: Run):
        c: EMAConfig = run.cfg.ema
        self.cfg, self.base_decay = c, c.decay
        self.reference_batch = c.base_batch_size or run.cfg.optim.base_batch_size or run.global_batch
        self.decay = float(c.decay ** (run.global_batch / self.reference_batch))
        self.average = Average(run.engines)
        self.last: dict[str, float] = {}

    def describe(self) -> str:
        return f"ema decay {self.decay:.6g}/step ({self.base_decay:g} @ {self.reference_batch})"

    def current_decay(self) -> float:
        n = self.average.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.cfg.warmup else self.decay

    def after_step(self, run: Run, out: StepOutput) -> None:
        if out.stepped:  # a skipped step leaves the average alone
            self.average.update(get_ema_multi_avg_fn(self.current_decay()))

    def after_eval(self, run: Run, metrics: dict[str, float]) -> None:
        self.last = evaluate_average(run, self.average, "eval_ema")

    def end(self, run: Run, status: str) -> None:
        if status == "finished" and self.cfg.save:
            keep_average(run, self.average)

    def summary(self, run: Run) -> dict[str, Any]:
        return {"eval_ema": self.last}

    def save(self, folder: Path, background: bool = False) -> Future[Any] | None:
        """Written before returning: the average is small next to the optimizer state."""
        self.average.save(folder)
        return None

    def load(self, folder: Path) -> None:
        self.average.load(folder, "ema.decay")
