"""Synchronised BatchNorm on any backend, and the norm-layer factory of the recipes.

`torch.nn.SyncBatchNorm` only accepts CUDA tensors. `DistributedBatchNorm` is the same
math for CPU/gloo: each rank's (count, mean, sum of squared deviations) per channel are
gathered in one differentiable all-gather (`AllGather`) and combined with Chan et al.'s
parallel formula, as torch's SyncBatchNorm combines per-rank means and variances
(E[x^2] - E[x]^2 in fp32 cancels catastrophically when the mean is large against the
spread). The backward pass flows through the global statistics, exactly as BatchNorm on the
concatenated batch would. Running statistics use the unbiased global variance, as BatchNorm does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn


class AllGather(torch.autograd.Function):
    """Every rank's `x`, stacked (world, *x.shape). Each rank's copy feeds that rank's loss and
    the total loss is their sum, so the gradient of rank r's input is the sum over ranks of
    the gradients reaching row r: one all-reduce, then this rank's row."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


def local_stats(x: torch.Tensor) -> torch.Tensor:
    """This rank's (count, per-channel mean, per-channel sum of squared deviations) of x (N, C, ...)."""
    dims = [0] + list(range(2, x.dim()))
    c = x.size(1)
    mean = x.mean(dims)
    m2 = ((x - mean.view([1, c] + [1] * (x.dim() - 2))) ** 2).sum(dims)
    n = torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)
    return torch.cat([n, mean, m2])


def combine(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's `local_stats`, stacked (world, 1 + 2C) -> the global (mean, biased
    variance, count) by Chan et al.'s parallel formula."""
    c = (stats.size(1) - 1) // 2
    counts, means, m2s = stats[:, :1], stats[:, 1 : c + 1], stats[:, c + 1 :]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (m2s + counts * (means - mean) ** 2).sum(0) / total
    return mean, var, total


class DistributedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm{1,2,3}d whose batch statistics span all ranks of the process group."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)

        momentum = self.momentum or 0.0
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as BatchNorm does
                momentum = 1.0 / float(self.num_batches_tracked)

        xf = x.float()  # statistics in fp32 also under autocast, as cuDNN BatchNorm does
        stats: torch.Tensor = AllGather.apply(local_stats(xf))  # type: ignore[no-untyped-call]
        mean, var, total = combine(stats)
        shape = [1, x.size(1)] + [1] * (x.dim() - 2)

        if self.training and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                unbiased = var * (total / (total - 1).clamp(min=1))
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased.detach(), momentum)

        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        out: torch.Tensor = y.to(x.dtype)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm in `module` made synchronised: torch's own on CUDA, ours elsewhere."""
    if device.type == "cuda":
        converted: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return converted
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, DistributedBatchNorm):
        out = DistributedBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:  # the same Parameters (as torch's own conversion does): requires_grad kept
            out.weight, out.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(module, name) is not None:
                getattr(out, name).copy_(getattr(module, name))
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device))
    return out


def make_norm(kind: str, dim: int) -> nn.Module:
    """The `model.norm` switch of the Transformer: LayerNorm, or scale-only RMSNorm."""
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    raise ValueError(f"unknown norm {kind!r}")
