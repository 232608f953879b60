"""The DeepSpeed engine: the `Engine` protocol on DeepSpeed, ZeRO stages 0-3.

The DeepSpeed config is derived from the recipe (batch sizes, accumulation, clipping,
precision, ZeRO stage), then `deepspeed.config` is merged over it. The optimizer and the
LR schedule are the very objects the DDP engine uses (torch.optim + the LambdaLR of
`dtrain.engines.optim`), handed to `deepspeed.initialize` as client optimizer and scheduler, so
the scaling rule, warmup and schedule are identical across engines.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
import torch.nn as nn

from dtrain.checkpoint import safeload
from dtrain.config import Config, OptimConfig, optim_sections
from dtrain.data import BatchPlan
from dtrain.engines import optim
from dtrain.engines.ddp import mismatch_line
from dtrain.engines.precision import AmpPrecision
from dtrain.errors import CheckpointError, ConfigError, ResumeRefused
from dtrain.protocols import ModelSpec, Precision
from dtrain.runtime import distributed

TAG = "state"


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ds_config(cfg: Config, plan: BatchPlan, o: OptimConfig | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config a recipe implies (`o`: the model's optimizer section)."""
    o = o or cfg.optim
    c: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.per_rank,
        "gradient_accumulation_steps": plan.accum,
        "gradient_clipping": o.clip_grad_norm,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "steps_per_print": 10**9,  # dtrain logs; DeepSpeed's own step prints would interleave
        "wall_clock_breakdown": False,
        # ZeRO partitions flat parameter shards, which is exact for the elementwise torch.optim
        # optimizers dtrain offers (Adafactor, the exception, is refused below).
        "zero_allow_untested_optimizer": True,
    }
    if cfg.precision == "bf16":
        c["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        c["fp16"] = {
            "enabled": True,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return deep_merge(c, cfg.deepspeed.config)


def prepare_cpu_ops(device: torch.device) -> None:
    """Select the CPU accelerator before deepspeed is imported, and build its comm op once
    per machine: two ranks JIT-compiling the same extension at once can abort."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed still calls the c10d names torch 2.13 deprecated; the warning is not the user's to fix.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)
    import deepspeed  # noqa: F401  (import after DS_ACCELERATOR is set)

    if device.type != "cpu":
        return
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    builder = ShareMemCommBuilder()
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        builder.load(verbose=False)
    distributed.barrier()
    builder.load(verbose=False)


def grad_norm_of(module: nn.Module) -> torch.Tensor:
    """The global L2 norm of `module`'s gradients (already all-reduced)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False) if grads else torch.zeros(())


_ZERO = "not with ZeRO (deepspeed.zero_stage > 0): ZeRO flattens parameters into shards, "
REFUSED = {
    "fp16": "not with engine=deepspeed on a machine without a GPU (DeepSpeed's CPU accelerator has no fp16); use "
    "bf16, or engine=ddp",
    "async": "not with engine=deepspeed (DeepSpeed writes its own checkpoint); use engine=ddp or fsdp",
    "gan": "a GAN's EMA of G needs whole parameters: use 0-2",
    "clip_value": "not supported with engine=deepspeed (DeepSpeed clips by norm: use optim.clip_grad_norm)",
    "schedulefree": "not with engine=deepspeed (its averaged weights need the optimizer's train/eval switch, which "
    "DeepSpeed's wrapper hides); use engine=ddp",
    "l1": "not supported with engine=deepspeed (DeepSpeed steps its own optimizer on gradients dtrain does not see); "
    "use engine=ddp or fsdp",
    "trust_ratio": _ZERO + "so a per-layer trust ratio would be taken over pieces of several layers; use engine=ddp or "
    "fsdp, or deepspeed.zero_stage=0",
    "adafactor": _ZERO + "which silently turns Adafactor's factored moments into full ones",
}
"""What this engine refuses in a recipe, and why (`DeepSpeedEngine.validate`)."""


class DeepSpeedEngine:
    name = "deepspeed"
    required = True

    @classmethod
    def read_weights(cls, folder: Path, model: nn.Module, trust: bool) -> dict[str, torch.Tensor]:
        """The fp32 weights of a ZeRO checkpoint of any stage (DeepSpeed's `zero_to_fp32`),
        which unpickles: only with `trust`."""
        if not trust:
            raise ConfigError(
                "checkpoints",
                str(folder.parent),
                "are DeepSpeed checkpoints, which unpickle (a "
                "crafted file can run code): add --trust if the run is yours or your team's",
            )
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights: dict[str, torch.Tensor] = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG)
        return weights

    @classmethod
    def check_resume(cls, saved_world: int, world: int) -> None:
        if saved_world != world:
            raise ResumeRefused(
                f"the checkpoint was written by {saved_world} DeepSpeed rank(s), this job has {world}: "
                f"ZeRO state is partitioned per rank, so resume on {saved_world} rank(s)"
            )

    @classmethod
    def capabilities(cls, cfg: Config) -> frozenset[str]:
        """ZeRO 0-2: the module holds whole parameters (in the compute dtype; the fp32 master copy
        DeepSpeed steps is its own); ZeRO-3: partitions, gathered only inside forward."""
        return frozenset({"weights"}) if cfg.deepspeed.zero_stage < 3 else frozenset()

    @classmethod
    def validate(cls, cfg: Config) -> None:
        stage, gpu = cfg.deepspeed.zero_stage, torch.cuda.is_available()
        refused: list[tuple[str, Any, bool, str]] = [
            ("precision", "fp16", cfg.precision == "fp16" and not gpu, REFUSED["fp16"]),
            ("checkpoint.async", True, cfg.checkpoint.async_, REFUSED["async"]),
            ("deepspeed.zero_stage", 3, getattr(cfg, "gan", None) is not None and stage == 3, REFUSED["gan"]),
        ]
        for key, o in optim_sections(cfg):
            refused += [
                (f"{key}.clip_grad_value", o.clip_grad_value, o.clip_grad_value > 0, REFUSED["clip_value"]),
                (f"{key}.name", o.name, o.name.startswith("schedulefree"), REFUSED["schedulefree"]),
                (f"{key}.l1", o.l1, o.l1 > 0, REFUSED["l1"]),
                (f"{key}.name", o.name, o.name in ("lars", "lamb") and stage > 0, REFUSED["trust_ratio"]),
                (f"{key}.name", o.name, o.name == "adafactor" and stage > 0, REFUSED["adafactor"]),
            ]
        for key, value, on, why in refused:
            if on:
                raise ConfigError(key, value, why)

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
    ) -> DeepSpeedEngine:
        return cls(spec.module, cfg, spec.optim, device=device, plan=plan, total_steps=total_steps)

    def __init__(
        self, module: nn.Module, cfg: Config, o: OptimConfig, *, device: torch.device, plan: BatchPlan, total_steps: int
    ):
        """`precision` here only autocasts: DeepSpeed holds bf16/fp16 weights and scales fp16
        losses itself, and autocast casts the fp32 inputs to match."""
        prepare_cpu_ops(device)
        import deepspeed

        distributed.init_single_process_group(device)  # DeepSpeed needs a group even for one rank
        self.device, self.zero_stage = device, cfg.deepspeed.zero_stage
        self.output_dir, self.trust = cfg.output_dir, cfg.checkpoint.trust
        self.precision: Precision = AmpPrecision(cfg.precision, device, loss_scaling=False)
        module = module.to(device)
        optimizer, scheduler, self.lr_info = optim.build(module, o, plan.global_batch, total_steps)
        self.config = ds_config(cfg, plan, o)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.config, dist_init_required=False
        )
        self.model = self.ds
        self.module = self.ds.module
        self._plain_optimizer = self.zero_stage == 0 and cfg.precision == "fp32"
        self.lr = self.scheduler.get_last_lr()[0]
        self.on_gradients: Callable[[], None] | None = None

    def no_sync(self, skip: bool) -> ContextManager[Any]:
        return contextlib.nullcontext()  # DeepSpeed reduces at accumulation boundaries on its own

    def backward(self, loss: torch.Tensor, micro_steps: int) -> None:
        self.ds.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # DeepSpeed counts micro-steps in step(); off the boundary it does not update

    def step(self) -> tuple[torch.Tensor, bool]:
        self.lr = self.scheduler.get_last_lr()[0]
        skipped = self.ds.skipped_steps
        # ZeRO stage 0 in fp32 steps the client optimizer directly and records no norm: measure
        # it here, on the gradients DeepSpeed all-reduced during the boundary's backward.
        measured = grad_norm_of(self.module) if self._plain_optimizer else None
        if self.on_gradients is not None:
            self.on_gradients()
        self.ds.step()
        norm = measured if measured is not None else self.ds.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else float(norm))
        return norm, self.ds.skipped_steps == skipped and bool(torch.isfinite(norm))

    def full_grads(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad

        grads = {n: safe_get_full_grad(p) for n, p in self.module.named_parameters()}
        return {n: g for n, g in grads.items() if g is not None}

    def full_params(self) -> dict[str, torch.Tensor]:
        """Collective under ZeRO-3. The optimizer's fp32 master where there is one; a frozen
        parameter (`model.freeze`) has none, so the module's own copy (gathered under ZeRO-3)."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for n, p in self.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is None:
                with deepspeed.zero.GatheredParameters([p], enabled=self.zero_stage == 3):
                    full = p.detach().float().clone()
            out[n] = full
        return out

    def evaluation_weights(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def sync_buffers(self) -> None:
        """Rank 0's buffers everywhere (DeepSpeed broadcasts them only at start)."""
        distributed.sync_buffers(self.module)

    def loss_scale(self) -> float | None:
        scale = getattr(self.ds.optimizer, "cur_scale", None)  # DeepSpeed's fp16 optimizers keep it here
        return float(scale) if self.precision.name == "fp16" and scale is not None else None

    def save(self, folder: Path, background: bool = False) -> None:
        """Collective: every rank writes its ZeRO partition (`background` is refused by the config)."""
        self.ds.save_checkpoint(str(folder), tag=TAG)

    def load(self, folder: Path) -> None:
        if not (self.trust or safeload.is_own(folder, self.output_dir)):
            raise ResumeRefused(
                f"{folder} is not in this run's output_dir ({self.output_dir}): DeepSpeed unpickles "
                "its checkpoint files, which can run code a crafted file holds; if you trust "
                "where it came from, resume with checkpoint.trust=true"
            )
        try:
            path, _ = self.ds.load_checkpoint(str(folder), tag=TAG)
        except Exception as e:  # a missing or foreign file: one line, not DeepSpeed's stack
            raise CheckpointError(f"cannot load the DeepSpeed checkpoint in {folder}: {mismatch_line(e)}") from None
        if path is None:
            raise CheckpointError(f"{folder} holds no DeepSpeed checkpoint")
        self.lr = self.scheduler.get_last_lr()[0]

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """A plain fp32 state_dict of the whole model (collective under ZeRO-3)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}
        return {
            k: v.detach().float().cpu().clone() if v.is_floating_point() else v.cpu().clone()
            for k, v in self.module.state_dict().items()
        }
