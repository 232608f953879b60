"""GAN losses (hinge, WGAN, non-saturating) and gradient penalties (WGAN-GP, R1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "wgan":
        return fake.mean() - real.mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()  # nonsaturating: -log D(x) - log(1 - D(G(z)))


def g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    if kind in ("hinge", "wgan"):
        return -fake.mean()
    return F.softplus(-fake).mean()  # nonsaturating: -log D(G(z))


def input_gradients(out: torch.Tensor, x: torch.Tensor, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """d sum(out) / dx with create_graph, for penalties. Under fp16 the AMP recipe: take the
    gradient of the *scaled* output (no underflow), then unscale it."""
    if scaler is not None and scaler.is_enabled():
        (g,) = torch.autograd.grad(scaler.scale(out.sum()), x, create_graph=True)
        return g / scaler.get_scale()
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return g


def grad_penalty_wgan_gp(grads: torch.Tensor) -> torch.Tensor:
    """Gulrajani et al. 2017: (||grad D(x_hat)||_2 - 1)^2 on interpolates x_hat."""
    norms: torch.Tensor = grads.flatten(1).norm(2, dim=1)
    return (norms - 1).pow(2).mean()


def grad_penalty_r1(grads: torch.Tensor) -> torch.Tensor:
    """Mescheder et al. 2018: ||grad D(x)||_2^2 on reals (the task applies gamma / 2)."""
    return grads.flatten(1).pow(2).sum(1).mean()
