"""Optimizers from torch.optim, the LR scaling rule, and warmup + schedule.

`optim.lr` is stated for a global batch of `optim.base_batch_size` (by default, 0: for the
run's own global batch, so the stated LR is the LR). The optimizer gets
    linear: lr * global / base      (Goyal et al. 2017, for SGD)
    sqrt:   lr * sqrt(global / base) (the usual rule for Adam-type optimizers)
    none:   lr
The schedule is a pure function of the optimizer step (`lr_factor`), wrapped in a
LambdaLR, so the DDP and DeepSpeed engines step the very same curve.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn as nn

from dtrain.config import OptimConfig
from dtrain.errors import ConfigError
from dtrain.protocols import LRInfo


def scaled_lr(o: OptimConfig, global_batch: int) -> float:
    ratio = global_batch / (o.base_batch_size or global_batch)
    return {"linear": o.lr * ratio, "sqrt": o.lr * math.sqrt(ratio), "none": o.lr}[o.scale_rule]


def lr_factor(o: OptimConfig, step: int, total_steps: int, peak_lr: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based).

    Warmup rises linearly to 1 over `warmup_steps` (step 0 gets 1/warmup, not 0, so the
    first step already moves); the schedule then runs over the remaining steps.
    """
    w = o.warmup_steps
    if step < w:
        return (step + 1) / w
    t = step - w
    span = max(1, total_steps - w)
    floor = o.min_lr / peak_lr if peak_lr > 0 else 0.0
    if o.schedule in ("constant", "plateau"):  # plateau: `Schedule` scales this by the drops so far
        return 1.0
    if o.schedule == "cosine":
        progress = min(t / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if o.schedule == "cosine_restarts":  # SGDR (Loshchilov & Hutter 2017): back to the peak each cycle
        start, period = 0, o.restart_steps or max(1, span // 4)
        while t >= start + period:
            start, period = start + period, max(1, round(period * o.restart_mult))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (t - start) / period))
    if o.schedule == "linear":
        progress = min(t / span, 1.0)
        return 1 - (1 - floor) * progress
    if o.schedule == "step":
        return o.gamma ** (t // o.step_size)
    if o.schedule == "multistep":
        return o.gamma ** sum(t >= m for m in o.milestones)
    if o.schedule == "exponential":
        return o.gamma**t
    raise ValueError(f"unknown schedule {o.schedule!r}")


def param_groups(model: nn.Module, o: OptimConfig) -> list[dict[str, Any]]:
    """Weight decay on matrices and conv kernels; none on norm weights and biases (1-D) unless asked."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 or o.decay_norm_and_bias else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(params: Iterable[Any], o: OptimConfig, lr: float, fused: bool = False) -> torch.optim.Optimizer:
    """`fused`: one kernel for the whole update (CUDA), where torch.optim has one."""
    name = o.name
    kernel = {"fused": True} if fused else {}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, nesterov=o.nesterov, **kernel)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=o.betas, eps=o.eps, **kernel)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=o.betas, eps=o.eps, **kernel)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=o.momentum, eps=o.eps)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=o.eps)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr)
    if name in ("lars", "lamb"):
        return large_batch_optimizer(list(params), o, lr)
    if name == "schedulefree_adamw":
        from pytorch_optimizer import ScheduleFreeAdamW

        return ScheduleFreeAdamW(params, lr=lr, betas=o.betas, eps=o.eps)
    if name == "schedulefree_sgd":
        from pytorch_optimizer import ScheduleFreeSGD

        return ScheduleFreeSGD(params, lr=lr, momentum=o.momentum)
    raise ValueError(f"unknown optimizer {name!r}")


def large_batch_optimizer(groups: list[Any], o: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """LARS (You et al. 2017) and LAMB (You et al. 2020) from pytorch_optimizer: each weight
    matrix / kernel gets its own LR from a trust ratio ||w|| / ||update||, so layers whose
    gradients are large next to their weights are not blown apart at huge batches. Norm weights
    and biases (1-D) take no trust ratio: LARS skips it for them itself; for LAMB they go in
    groups with `adam=True` (plain Adam). LAMB's update is pytorch_optimizer's: the first
    moment bias-corrected, the second not; decoupled weight decay."""
    from pytorch_optimizer import LARS, Lamb

    if o.name == "lars":
        return LARS(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov, trust_coefficient=o.trust_coefficient)
    split = []
    for g in groups:
        params = list(g["params"])
        split += [
            {**g, "params": [p for p in params if p.ndim >= 2]},
            {**g, "params": [p for p in params if p.ndim < 2], "adam": True},
        ]
    return Lamb([g for g in split if g["params"]], lr=lr, betas=o.betas, eps=o.eps)


def improvement(
    metrics: dict[str, float], key: str, metric: str, best: float, mode: str, min_delta: float = 0.0
) -> tuple[float, bool]:
    """The watched eval `metric`'s value, and whether it beats `best` (nan: nothing yet) by more
    than `min_delta` in `mode` (min or max). Shared by the plateau schedule and early stopping;
    a metric the task does not report is a ConfigError naming the recipe `key`."""
    if metric not in metrics:
        raise ConfigError(
            key, metric, f"not an eval metric of this task; it reports {', '.join(sorted(metrics)) or 'none'}"
        )
    value = metrics[metric]
    if math.isnan(value):  # a diverged evaluation is never the best one
        return value, False
    better = value < best - min_delta if mode == "min" else value > best + min_delta
    return value, math.isnan(best) or better


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """`lr_factor` of the optimizer step; under `optim.schedule=plateau` times gamma ** (drops so
    far), where a drop follows `plateau_patience` evaluations without improvement (`observe`).
    The plateau's state is part of `state_dict`, so it resumes with the checkpoint."""

    def __init__(self, opt: torch.optim.Optimizer, o: OptimConfig, total_steps: int, peak_lr: float):
        self.o = o
        self.plateau: dict[str, float] = {"scale": 1.0, "best": float("nan"), "bad": 0.0}
        floor = o.min_lr / peak_lr if peak_lr > 0 else 0.0
        super().__init__(
            opt,
            lambda step: (
                max(floor, lr_factor(o, step, total_steps, peak_lr) * self.plateau["scale"])
                if o.schedule == "plateau" and step >= o.warmup_steps
                else lr_factor(o, step, total_steps, peak_lr)
            ),
        )

    def observe(self, metrics: dict[str, float]) -> bool:
        """One evaluation's metrics; True when the LR dropped (from the next step on)."""
        o, p = self.o, self.plateau
        if o.schedule != "plateau":
            return False
        value, improved = improvement(metrics, "optim.plateau_metric", o.plateau_metric, p["best"], o.plateau_mode)
        if improved:
            p["best"], p["bad"] = value, 0.0
            return False
        p["bad"] += 1
        if p["bad"] < o.plateau_patience:
            return False
        p["scale"], p["bad"] = p["scale"] * o.gamma, 0.0
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):  # takes effect now, not next step
            group["lr"] = base * self.lr_lambdas[0](self.last_epoch)
        return True

    def state_dict(self) -> dict[str, Any]:
        """LambdaLR's (which includes `plateau`, plain numbers), without the config: checkpoints
        hold tensors and plain values only (they load with weights_only=True)."""
        state = super().state_dict()
        state.pop("o")
        return state


def build_scheduler(opt: torch.optim.Optimizer, o: OptimConfig, total_steps: int, peak_lr: float) -> Schedule:
    return Schedule(opt, o, total_steps, peak_lr)


def build(
    model: nn.Module, o: OptimConfig, global_batch: int, total_steps: int
) -> tuple[torch.optim.Optimizer, Schedule, LRInfo]:
    """(optimizer, scheduler, the LR it gets) for `model` under section `o`."""
    peak = scaled_lr(o, global_batch)
    # Fused kernels on CUDA (the elementwise math is the same as the for-loop's); off the GPU
    # torch's default implementation.
    fused = all(p.is_cuda for p in model.parameters())
    opt = build_optimizer(param_groups(model, o), o, peak, fused=fused)
    info = LRInfo(
        peak=peak,
        base=o.lr,
        base_batch=o.base_batch_size or global_batch,
        rule=o.scale_rule,
        warmup_steps=o.warmup_steps,
    )
    return opt, build_scheduler(opt, o, total_steps, peak), info
