"""The DDP engine: PyTorch DistributedDataParallel + torch.optim + torch.amp."""

from __future__ import annotations

import contextlib
import inspect
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain import checkpoint
from dtrain.config import Config, OptimConfig
from dtrain.data import BatchPlan
from dtrain.engines import optim
from dtrain.engines.precision import AmpPrecision
from dtrain.errors import CheckpointError
from dtrain.protocols import ModelSpec, Precision
from dtrain.runtime import distributed


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


@torch.no_grad()
def add_l1(params: list[nn.Parameter], l1: float) -> None:
    """The L1 subgradient l1 x sign(w) on matrices and kernels (not norm weights or biases)."""
    for p in params:
        if p.grad is not None and p.ndim >= 2:
            p.grad.add_(p.sign(), alpha=l1)


def mismatch_line(e: BaseException) -> str:
    """load_state_dict's report in one line: its first specific complaint, not its header."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else (lines or [repr(e)])[0]
    return detail[:300]


def _buffer_sync_kwarg(sync: bool) -> dict[str, Any]:
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers (same per-forward meaning).
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": sync}
    return {"broadcast_buffers": sync}


class DDPEngine:
    name = "ddp"
    required = True

    @classmethod
    def validate(cls, cfg: Config) -> None:
        """What this engine refuses in `cfg`, before any rank starts (ConfigError): nothing;
        DDP runs every feature, precision and optimizer."""

    @classmethod
    def capabilities(cls, cfg: Config) -> frozenset[str]:
        """Whole replicas (FSDP2: sharded DTensors) that the optimizer steps in place."""
        return frozenset({"weights", "weights_in_place"})

    @classmethod
    def build(
        cls,
        spec: ModelSpec,
        cfg: Config,
        *,
        device: torch.device,
        plan: BatchPlan,
        total_steps: int,
        precision: AmpPrecision,
    ) -> DDPEngine:
        """The registry's one constructor signature (`dtrain.engines.build_engines`)."""
        return cls(
            spec.module,
            spec.optim,
            precision=precision,
            device=device,
            global_batch=plan.global_batch,
            total_steps=total_steps,
            broadcast_buffers=spec.broadcast_buffers,
        )

    @classmethod
    def read_weights(cls, folder: Path, model: nn.Module, trust: bool) -> dict[str, torch.Tensor]:
        """The plain state_dict of `model` that one of this engine's checkpoint folders holds
        (`step_X/model`), read in one process without a process group (`dtrain average`)."""
        weights: dict[str, torch.Tensor] = checkpoint.load_file(folder / "state.pt")["model"]
        return weights

    @classmethod
    def check_resume(cls, saved_world: int, world: int) -> None:
        """Refuse (ResumeRefused) a checkpoint of `saved_world` ranks this engine cannot continue on
        `world`: none; a replica's state is whole on every rank."""

    def __init__(
        self,
        module: nn.Module,
        o: OptimConfig,
        *,
        precision: AmpPrecision,
        device: torch.device,
        global_batch: int,
        total_steps: int,
        broadcast_buffers: bool = True,
    ):
        self.device = device
        self.precision: Precision = precision
        self.module = module.to(device)
        self.model: nn.Module = self.module
        if distributed.world_size() > 1:
            # broadcast_buffers copies rank 0's buffers (e.g. BN running stats) to all ranks
            # before each forward; with synchronised BN they are already equal, so it is skipped.
            self.model = DDP(
                self.module,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=False,
                **_buffer_sync_kwarg(broadcast_buffers),
            )
        self._optimize(o, global_batch, total_steps)

    def _optimize(self, o: OptimConfig, global_batch: int, total_steps: int) -> None:
        """The optimizer, schedule and clipping of `self.module`'s trainable parameters."""
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer, self.scheduler, self.lr_info = optim.build(self.module, o, global_batch, total_steps)
        self.clip_norm, self.clip_value = o.clip_grad_norm, o.clip_grad_value
        self.l1 = o.l1
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.on_gradients: Callable[[], None] | None = None

    def no_sync(self, skip: bool) -> ContextManager[Any]:
        return self.model.no_sync() if skip and isinstance(self.model, DDP) else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, micro_steps: int) -> None:
        self.precision.scaler.scale(loss / micro_steps).backward()

    def step(self) -> tuple[torch.Tensor, bool]:
        scaler = self.precision.scaler
        scaler.unscale_(self.optimizer)
        if self.on_gradients is not None:
            self.on_gradients()
        if self.l1:
            add_l1(self.params, self.l1)
        norm = clip_gradients(self.params, self.clip_norm, self.clip_value)
        finite = bool(torch.isfinite(norm))  # the norm is global: every rank decides alike
        self.lr = self.optimizer.param_groups[0]["lr"]
        if finite:
            scaler.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        if finite:  # as DeepSpeed does: a skipped step does not advance the schedule
            self.scheduler.step()
        return norm, finite

    def full_grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad for n, p in self.module.named_parameters() if p.grad is not None}

    def full_params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.module.named_parameters()}

    @contextlib.contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """A schedule-free optimizer trains at y and averages x: evaluate and save x."""
        to_eval, to_train = getattr(self.optimizer, "eval", None), getattr(self.optimizer, "train", None)
        if to_eval is None or to_train is None:  # every other optimizer: the weights are what they are
            yield
            return
        to_eval()
        try:
            yield
        finally:
            to_train()

    def sync_buffers(self) -> None:
        """Rank 0's buffers everywhere: without synchronised BatchNorm each rank's running
        statistics drift apart, and evaluation must see exactly what model.pt holds."""
        distributed.sync_buffers(self.module)

    def loss_scale(self) -> float | None:
        scaler = self.precision.scaler
        return scaler.get_scale() if scaler.is_enabled() else None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        try:
            self.module.load_state_dict(sd["model"])
            self.optimizer.load_state_dict(sd["optimizer"])
            self.scheduler.load_state_dict(sd["scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:  # another model: name the first mismatch
            raise CheckpointError(f"holds a different model or optimizer: {mismatch_line(e)}") from None
        if sd.get("scaler"):
            self.precision.scaler.load_state_dict(sd["scaler"])
        self.lr = self.optimizer.param_groups[0]["lr"]

    def save(self, folder: Path, background: bool = False) -> Future[None] | None:
        """Rank 0 writes one file; DDP ranks hold identical replicas."""
        if not distributed.is_main():
            return None
        folder.mkdir(parents=True, exist_ok=True)
        if background:
            return checkpoint.save_in_background(self.state_dict(), folder / "state.pt")
        checkpoint.atomic_save(self.state_dict(), folder / "state.pt")
        return None

    def load(self, folder: Path) -> None:
        try:
            self.load_state_dict(checkpoint.load_file(folder / "state.pt", self.device))
        except CheckpointError as e:
            raise CheckpointError(str(e) if str(folder) in str(e) else f"{folder}: {e}") from None

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()
