"""The training step, and the DDP engine it runs on.

`train_step` is the whole data path of one optimizer step, top to bottom. What differs
between PyTorch DDP and DeepSpeed lives behind the small engine interface it calls:

    engine.model              the wrapped model to call forward on
    engine.module             the plain model (eval, state_dict, model.pt)
    engine.autocast()         the precision context for forward
    engine.no_sync(skip)      suppress the gradient all-reduce on non-final micro-steps
    engine.backward(loss, n)  backward of one of n micro-steps
    engine.step()             unscale, measure the global norm, clip, check, step, schedule
    engine.lr                 the LR the optimizer used for the last step
    engine.save(dir) / engine.load(dir)           checkpoint files
    engine.consolidated_state_dict()             plain state_dict for model.pt

`DDPEngine` is below; `dtrain.deepspeed_engine.DeepSpeedEngine` is the other one.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain import checkpoint, distributed, optim
from dtrain.data import batch_len, head, move
from dtrain.config import OptimConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepOutput:
    loss: torch.Tensor
    """Mean loss over the step's micro-batches on this rank (a device tensor: no sync)."""
    grad_norm: torch.Tensor
    """Global L2 norm of the all-reduced, unscaled gradient before clipping (same on every rank)."""
    stepped: bool
    """False when the step was skipped for a non-finite gradient."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """More per-rank values to average over the log window and the ranks (e.g. a GAN's G loss)."""


def train_step(engine, task, micro_batches: list) -> StepOutput:
    """One optimizer step over `len(micro_batches)` micro-batches of this rank."""
    n = len(micro_batches)
    loss_sum = torch.zeros((), device=engine.device)
    for i, batch in enumerate(micro_batches):
        # DDP all-reduces gradients bucket by bucket during the last micro-step's backward;
        # the earlier micro-steps only accumulate locally, so one step costs one all-reduce.
        with engine.no_sync(skip=i < n - 1):
            with engine.autocast():
                loss = task.loss(engine.model, batch)
            engine.backward(loss, n)
        loss_sum += loss.detach().float()
    grad_norm, stepped = engine.step()
    return StepOutput(loss_sum / n, grad_norm, stepped)


@torch.no_grad()
def evaluate(task, engine, loader, device: torch.device) -> dict[str, float]:
    """Exact sharded evaluation: per-rank sums over disjoint shards, all-reduced, then metrics.

    Every rank runs one forward per loader batch, and the loader gives every rank the same
    number of batches (padded shards, see `data.ExactShardSampler`); the padding is cut off
    before the sums, or, for a batch of padding only, its sums are weighted by zero.
    """
    model = engine.module
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    real_left = getattr(loader.sampler, "num_real", len(loader.sampler))
    for batch in loader:
        n = batch_len(batch)
        keep = min(n, real_left)
        real_left -= keep
        with engine.autocast():
            out = task.eval_sums(model, move(head(batch, keep) if 0 < keep < n else batch, device))
        for k, v in out.items():  # a batch of padding only still names the keys, with zeros
            sums[k] = sums.get(k, 0) + (v.detach().double() if keep else torch.zeros_like(v, dtype=torch.float64))
    model.train(was_training)
    if not sums:  # an empty evaluation set
        return {}
    keys = sorted(sums)
    reduced = distributed.all_reduce_sum(torch.stack([torch.as_tensor(sums[k], device=device) for k in keys]))
    return {k: float(v) for k, v in task.eval_metrics(dict(zip(keys, reduced.tolist()))).items()}


def clip_gradients(params: list[nn.Parameter], max_norm: float, max_value: float) -> torch.Tensor:
    """Measure the global gradient norm, then clip by value and/or by norm. Returns the pre-clip norm.

    Called after the all-reduce (and after unscaling under fp16), so the norm is the true
    global norm and identical on every rank: clipping keeps the ranks' parameters equal.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
    if max_value > 0:
        torch.nn.utils.clip_grad_value_(params, max_value)
    if max_norm > 0:
        if max_value > 0:  # value clipping changed the gradient: clip what is there now
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def mismatch_line(e: BaseException) -> str:
    """load_state_dict's report in one line: its first specific complaint, not its header."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else (lines or [repr(e)])[0]
    return detail[:300]


def _buffer_sync_kwarg(sync: bool) -> dict[str, bool]:
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers (same per-forward meaning).
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": sync}
    return {"broadcast_buffers": sync}


class DDPEngine:
    """PyTorch DistributedDataParallel + torch.optim + torch.amp."""

    name = "ddp"

    def __init__(self, module: nn.Module, o: OptimConfig, *, precision: str, device: torch.device,
                 global_batch: int, total_steps: int, broadcast_buffers: bool = True,
                 scaler: torch.amp.GradScaler | None = None):
        self.device, self.precision = device, precision
        self.module = module.to(device)
        if distributed.world_size() > 1:
            # broadcast_buffers copies rank 0's buffers (e.g. BN running stats) to all ranks
            # before each forward; with synchronised BN they are already equal, so it is skipped.
            self.model = DDP(self.module, device_ids=[device.index] if device.type == "cuda" else None,
                             find_unused_parameters=False, **_buffer_sync_kwarg(broadcast_buffers))
        else:
            self.model = self.module
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer, self.scheduler, self.peak_lr = optim.build(self.module, o, global_batch, total_steps)
        # fp16 needs loss scaling; bf16 has fp32's exponent range and does not.
        self.scaler = scaler or torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.clip_norm, self.clip_value = o.clip_grad_norm, o.clip_grad_value
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.scale_rule, self.base_lr, self.base_batch, self.warmup_steps = (o.scale_rule, o.lr, o.base_batch_size,
                                                                              o.warmup_steps)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision], enabled=self.precision != "fp32")

    def no_sync(self, skip: bool):
        return self.model.no_sync() if skip and isinstance(self.model, DDP) else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, micro_steps: int) -> None:
        self.scaler.scale(loss / micro_steps).backward()

    def step(self, update_scaler: bool = True) -> tuple[torch.Tensor, bool]:
        self.scaler.unscale_(self.optimizer)
        norm = clip_gradients(self.params, self.clip_norm, self.clip_value)
        # The norm is global, so every rank takes the same decision here.
        finite = bool(torch.isfinite(norm))
        self.lr = self.optimizer.param_groups[0]["lr"]
        if finite:
            self.scaler.step(self.optimizer)
        if update_scaler:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:  # as DeepSpeed does: a skipped step does not advance the schedule
            self.scheduler.step()
        return norm, finite

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        try:
            self.module.load_state_dict(sd["model"])
            self.optimizer.load_state_dict(sd["optimizer"])
            self.scheduler.load_state_dict(sd["scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:  # another model: name the first mismatch
            raise checkpoint.CheckpointError(f"holds a different model or optimizer: {mismatch_line(e)}") from None
        if sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])
        self.lr = self.optimizer.param_groups[0]["lr"]

    def save(self, folder: Path) -> None:
        """Rank 0 writes one file; DDP ranks hold identical replicas."""
        if distributed.is_main():
            folder.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_save(self.state_dict(), folder / "state.pt")

    def load(self, folder: Path) -> None:
        try:
            self.load_state_dict(checkpoint.load_file(folder / "state.pt", self.device))
        except checkpoint.CheckpointError as e:
            raise checkpoint.CheckpointError(f"{folder}: {e}" if str(folder) not in str(e) else str(e)) from None

    def sync_buffers(self) -> None:
        """Rank 0's buffers everywhere: without synchronised BatchNorm each rank's running
        statistics drift apart, and evaluation must see exactly what model.pt holds."""
        distributed.sync_buffers(self.module)

    def loss_scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler.is_enabled() else None

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()
