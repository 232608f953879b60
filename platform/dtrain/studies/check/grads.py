"""`gradcheck`: the platform's own differentiable pieces against finite differences, in float64
(`torch.autograd.gradcheck`): the CPU SyncBatchNorm's statistics combination, the Transformer's
norm layers, and the GAN gradient penalties (a gradient of a gradient)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.gradcheck import GradcheckError
from torch.func import functional_call

from dtrain.engines.norm import combine, local_stats, make_norm
from dtrain.studies.check.context import Context, Result
from dtrain.tasks.gan.losses import grad_penalty_r1, grad_penalty_wgan_gp, input_gradients

EXPECTED = "gradcheck passes (float64)"


def _sync_bn(world: int) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...], float]:
    """DistributedBatchNorm's math with `world` simulated ranks in one process: each chunk's
    local statistics, combined, normalise the whole batch. Its output must also equal
    BatchNorm's on the concatenated batch."""
    x = torch.randn(4 * world, 3, 2, 2, dtype=torch.float64) * 3 + 5  # a mean well above the spread
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mean, var, _ = combine(torch.stack([local_stats(c) for c in x.chunk(world)]))
        shape = [1, 3, 1, 1]
        return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + 1e-5) * w.view(shape) + b.view(shape)

    diff = float((fn(x, w, b) - F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)).abs().max())
    return fn, (x, w, b), diff


def _module(module: nn.Module, x: torch.Tensor) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """A module as a function of (input, *parameters), so gradcheck covers the parameters too."""
    module = module.double()
    names = [n for n, _ in module.named_parameters()]

    def fn(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = functional_call(module, dict(zip(names, params)), (x,))
        return out

    return fn, (x, *(p.detach() for p in module.parameters()))


def _penalty(kind: str) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """A critic's gradient penalty as a function of (inputs, critic parameters): its gradient
    is a gradient of a gradient, the path a wrong create_graph breaks."""
    critic = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    names = [n for n, _ in critic.named_parameters()]
    penalty = grad_penalty_r1 if kind == "r1" else grad_penalty_wgan_gp

    def fn(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        x = x if x.requires_grad else x.requires_grad_(True)
        out = functional_call(critic, dict(zip(names, params)), (x,)).flatten()
        return penalty(input_gradients(out, x, None))

    return fn, (torch.randn(4, 3, dtype=torch.float64), *(p.detach() for p in critic.parameters()))


def check_gradients(ctx: Context) -> list[Result]:
    torch.manual_seed(0)
    cases: dict[str, tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...], str]] = {}
    fn, args, bn_diff = _sync_bn(world=2)
    cases["sync_bn"] = (fn, args, f"2 simulated ranks; max |output - BatchNorm on the whole batch| {bn_diff:.2g}")
    for kind in ("layernorm", "rmsnorm"):
        fn, args = _module(make_norm(kind, 6), torch.randn(2, 3, 6, dtype=torch.float64))
        cases[kind] = (fn, args, f"dtrain.engines.norm.make_norm({kind!r})")
    for kind in ("r1", "wgan_gp"):
        fn, args = _penalty(kind)
        cases[f"penalty_{kind}"] = (fn, args, "input_gradients + the penalty, w.r.t. inputs and critic weights")
    results = []
    for name, (fn, args, note) in cases.items():
        inputs = tuple(a.detach().clone().requires_grad_(True) for a in args)
        try:
            ok = torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)
            ok = ok and (name != "sync_bn" or bn_diff < 1e-9)  # and the forward is BatchNorm's
            results.append(Result(f"gradcheck/{name}", "PASS" if ok else "FAIL", None, EXPECTED, note))
        except GradcheckError as e:
            first = str(e).strip().splitlines()[0]
            results.append(Result(f"gradcheck/{name}", "FAIL", None, EXPECTED, f"{note}: {first}"))
    return results
