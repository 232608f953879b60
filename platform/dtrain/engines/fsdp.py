"""The FSDP2 engine: `torch.distributed.fsdp.fully_shard` per block, checkpoints with
`torch.distributed.checkpoint` (DCP).

Every block the task names (`ModelSpec.blocks`) becomes one FSDP unit, then the root takes
what is left (embeddings, head): each rank holds 1/world of every parameter, gradient and
optimizer state, all-gathers a unit's parameters for its forward and backward and
reduce-scatters its gradients. The optimizer, the LR rule and schedule, clipping on the
global norm and the step itself are the DDP engine's (the parameters are DTensors, which
torch.optim and `clip_grad_norm_` handle), so the two engines step the same math.

Mixed precision is FSDP's `MixedPrecisionPolicy`: under bf16 the all-gathered parameters
and the forward are bf16 while the sharded master weights and the optimizer stay fp32, and
gradients are reduced in `fsdp.reduce_dtype`. There is no autocast on top.

Checkpoints: each rank writes its own shards with DCP into the checkpoint folder, so a
checkpoint can be resumed on another world size (DCP reshards on load); `model.pt` is still
a plain full state_dict.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ContextManager, Iterator

import torch
import torch.nn as nn
from torch.distributed.checkpoint import state_dict_saver
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from dtrain import checkpoint
from dtrain.checkpoint import dcp
from dtrain.config import Config, OptimConfig, optim_sections
from dtrain.data import BatchPlan
from dtrain.engines.ddp import DDPEngine
from dtrain.engines.precision import DTYPES, AmpPrecision
from dtrain.errors import CheckpointError, ConfigError
from dtrain.protocols import ModelSpec
from dtrain.runtime import distributed

EXTRA = "extra.pt"
"""Beside the DCP shards: the schedule's and the loss scaler's state (rank 0)."""


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard(
    module: nn.Module,
    blocks: list[nn.Module],
    cfg: Config,
    mesh: Any,
    offload: OffloadPolicy | None = None,
    keep_root: bool = True,
) -> None:
    """`fully_shard` each block, then the root, in `cfg.precision` (a distillation teacher too).
    `keep_root=False`: the root's parameters are freed after forward as well (a model that
    never runs backward would otherwise hold them whole for good)."""
    f, offload = cfg.fsdp, offload or OffloadPolicy()
    policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[cfg.precision] if cfg.precision != "fp32" else None, reduce_dtype=DTYPES[f.reduce_dtype]
    )
    if cfg.precision != "fp32":
        # BatchNorm computes in fp32, as autocast runs it: a unit of its own gathers fp32
        # parameters, takes its input in fp32 and hands its output on in the compute dtype.
        norm_policy = MixedPrecisionPolicy(
            param_dtype=torch.float32, reduce_dtype=DTYPES[f.reduce_dtype], output_dtype=DTYPES[cfg.precision]
        )
        for norm in [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
            fully_shard(norm, mesh=mesh, mp_policy=norm_policy, offload_policy=offload)
    for block in blocks:
        fully_shard(
            block, mesh=mesh, reshard_after_forward=f.reshard_after_forward, mp_policy=policy, offload_policy=offload
        )
    # The root's parameters are gathered last in backward's order anyway: keeping them
    # unsharded after forward saves one all-gather per step (torchtitan does the same).
    fully_shard(module, mesh=mesh, reshard_after_forward=not keep_root, mp_policy=policy, offload_policy=offload)


class FSDPEngine(DDPEngine):
    name = "fsdp"

    @classmethod
    def validate(cls, cfg: Config) -> None:
        if cfg.precision == "fp16":
            raise ConfigError(
                "precision",
                "fp16",
                "not supported with engine=fsdp (FSDP2 keeps fp32 master "
                "weights and computes in bf16 without loss scaling): use precision=bf16",
            )
        for key, o in optim_sections(cfg):
            if o.name in ("lars", "lamb", "schedulefree_adamw", "schedulefree_sgd"):
                raise ConfigError(
                    f"{key}.name",
                    o.name,
                    "not with engine=fsdp (pytorch_optimizer's implementation "
                    "uses in-place ops that FSDP2's DTensor shards do not support); use engine=ddp",
                )
        if getattr(cfg, "gan", None) is not None:
            raise ConfigError(
                "engine",
                "fsdp",
                "not for a GAN: its gradient penalty differentiates through FSDP's "
                "gather/reshard of the critic (a double backward FSDP2 does not support), and its EMA "
                "of G needs whole parameters; use ddp or deepspeed (zero_stage 0-2)",
            )

    @classmethod
    def read_weights(cls, folder: Path, model: nn.Module, trust: bool) -> dict[str, torch.Tensor]:
        """DCP shards of any world size, read whole into the plain model's tensors."""
        state = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
        try:
            dcp.dcp_load(state, folder, no_dist=True)
        except Exception as e:  # DCP's errors name every rank; the first is the cause
            raise CheckpointError(f"cannot read {folder}: {dcp.first_cause(e)}") from None
        weights: dict[str, torch.Tensor] = state["model"]
        return weights

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
    ) -> FSDPEngine:
        return cls(
            spec.module,
            spec.blocks,
            cfg,
            spec.optim,
            device=device,
            global_batch=plan.global_batch,
            total_steps=total_steps,
        )

    def __init__(
        self,
        module: nn.Module,
        blocks: list[nn.Module],
        cfg: Config,
        o: OptimConfig,
        *,
        device: torch.device,
        global_batch: int,
        total_steps: int,
    ):
        distributed.init_single_process_group(device)  # FSDP's device mesh needs a group even for one rank
        self.device = device
        # The policy casts parameters and inputs; an autocast on top would only cast again.
        self.precision = AmpPrecision(cfg.precision, device, loss_scaling=False, autocast=False)
        offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.fsdp.offload else OffloadPolicy()
        module = module.to("cpu" if cfg.fsdp.offload else device)
        shard(module, blocks, cfg, init_device_mesh(device.type, (distributed.world_size(),)), offload)
        self.module = self.model = module
        self._optimize(o, global_batch, total_steps)
        self._writer_group: Any = None

    def no_sync(self, skip: bool) -> ContextManager[Any]:
        return self._without_gradient_sync() if skip else contextlib.nullcontext()

    @contextlib.contextmanager
    def _without_gradient_sync(self) -> Iterator[None]:
        """Accumulate unsharded local gradients; the last micro-step reduce-scatters their sum."""
        assert isinstance(self.module, FSDPModule)
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def full_grads(self) -> dict[str, torch.Tensor]:
        return {n: _full(p.grad) for n, p in self.module.named_parameters() if p.grad is not None}

    def full_params(self) -> dict[str, torch.Tensor]:
        return {n: _full(p.detach()) for n, p in self.module.named_parameters()}

    # ------------------------------------------------------------------ state

    def save(self, folder: Path, background: bool = False) -> Future[Any] | None:
        """Collective: every rank writes its shards (DCP); rank 0 adds the schedule's state.
        `background`: return once the shards are staged in memory, writing on a thread."""
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        folder.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            checkpoint.atomic_save(
                {"scheduler": self.scheduler.state_dict(), "scaler": self.precision.scaler.state_dict()}, folder / EXTRA
            )
        if background:
            # The writer thread gathers the save plan with collectives of its own: on the training
            # group they could interleave with the step's and deadlock, so it gets a group of its own.
            if self._writer_group is None:
                self._writer_group = torch.distributed.new_group(backend="gloo")
            future = state_dict_saver.async_save(state, checkpoint_id=folder, process_group=self._writer_group)
            assert isinstance(future, Future)  # (the thread stager's kind: not an AsyncSaveResponse)
            return future
        state_dict_saver.save(state, checkpoint_id=folder)
        return None

    def load(self, folder: Path) -> None:
        """Any world size: DCP reads the saved shards into this job's sharding."""
        if not (folder / ".metadata").exists():
            raise CheckpointError(f"{folder} holds no FSDP (DCP) checkpoint")
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        try:  # DCP loads in place, into the tensors of this job's sharding
            dcp.dcp_load({"model": model_sd, "optimizer": optim_sd}, folder)
            set_state_dict(self.module, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        except Exception as e:  # DCP wraps every rank's failure; one line of the first is enough
            raise CheckpointError(f"cannot load {folder}: {dcp.first_cause(e)}") from None
        extra = checkpoint.load_file(folder / EXTRA, self.device)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.lr = self.optimizer.param_groups[0]["lr"]

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the whole model in CPU memory on every rank, gathered one tensor at a
        time (a device never holds more than one whole parameter beyond its shards)."""
        return {k: _full(v).detach().cpu() for k, v in self.module.state_dict().items()}
