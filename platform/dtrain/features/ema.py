"""An exponential moving average of the weights (`ema.*`), for every supervised task and engine.

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
engines (`ema/`), so it resumes exactly, on another world size too.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from dtrain.runtime import distributed
from dtrain.errors import CheckpointError
from dtrain.config import EMAConfig
from dtrain.protocols import Engine

log = logging.getLogger("dtrain")


class EMA:
    required = False
    """A checkpoint without `ema/` (written before EMA was turned on) still loads: the
    shadow then starts from the loaded weights."""

    def __init__(self, cfg: EMAConfig, engines: dict[str, Engine], global_batch: int, reference_batch: int):
        self.base_decay, self.warmup = cfg.decay, cfg.warmup
        self.reference_batch = cfg.base_batch_size or reference_batch or global_batch
        self.decay = float(cfg.decay ** (global_batch / self.reference_batch))
        self.live: dict[str, torch.Tensor] = {}
        self.modules = [engine.module for engine in engines.values()]
        for name, engine in engines.items():
            for key, t in [*engine.module.named_parameters(), *engine.module.named_buffers()]:
                if t.is_floating_point():
                    self.live[f"{name}.{key}"] = t
        self.shadow = {k: t.detach().float().clone() for k, t in self.live.items()}
        self.updates = 0

    def describe(self) -> str:
        return f"ema decay {self.decay:.6g}/step ({self.base_decay:g} @ {self.reference_batch})"

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step that stepped (a skipped step leaves the average alone)."""
        update = get_ema_multi_avg_fn(self.current_decay())
        # One foreach call per kind of tensor: under FSDP2 the parameters are DTensor shards and
        # the BatchNorm buffers plain tensors, which one foreach op may not mix.
        for sharded in (True, False):
            keys = [k for k, t in self.live.items() if distributed.is_sharded(t) == sharded]
            if keys:
                live = [self.live[k].detach() if self.live[k].dtype == torch.float32 else self.live[k].detach().float()
                        for k in keys]
                update([self.shadow[k] for k in keys], live, None)
        self.updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped(self) -> Iterator[None]:
        """Inside: the models hold the shadow weights (evaluation, model.pt); after: the live ones."""
        saved = {k: t.detach().clone() for k, t in self.live.items()}
        try:
            self._reshard()
            for k, t in self.live.items():
                t.copy_(self.shadow[k])
            yield
        finally:
            self._reshard()
            for k, t in self.live.items():
                t.copy_(saved[k])

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

    # ------------------------------------------------------------------ checkpoint

    def _state(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "updates": torch.tensor(self.updates)}

    def save(self, folder: Path, background: bool = False) -> Future[None] | None:
        """Collective (DCP): replicated shadows are written once, shards by their ranks. (Written
        before returning: the average is small next to the optimizer state the engines write.)"""
        from torch.distributed.checkpoint import state_dict_saver

        with _single_process_is_intended():
            state_dict_saver.save(self._state(), checkpoint_id=folder, no_dist=not torch.distributed.is_initialized())
        return None

    def load(self, folder: Path) -> None:
        if not folder.exists():
            log.warning("resume: %s has no EMA (written with ema.decay=0); the average starts from the loaded "
                        "weights", folder.parent.name)
            self.shadow = {k: t.detach().float().clone() for k, t in self.live.items()}
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
