"""The GAN's networks: MLPs for 2-D mixtures, a DCGAN-style pair for 8x8 digits."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm


def _sn(layer: nn.Module, on: bool) -> nn.Module:
    return spectral_norm(layer) if on else layer


class MLP(nn.Module):
    def __init__(self, d_in: int, d_out: int, hidden: int, layers: int, act: nn.Module, sn: bool):
        super().__init__()
        dims = [d_in] + [hidden] * layers
        body = []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [_sn(nn.Linear(a, b), sn), copy.deepcopy(act)]
        self.net = nn.Sequential(*body, _sn(nn.Linear(dims[-1], d_out), sn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.net(x)
        return y


class DCGenerator(nn.Module):
    """z -> 2x2 -> 4x4 -> 8x8 with transposed convolutions, BatchNorm, tanh output."""

    def __init__(self, z_dim: int, ch: int, sn: bool):
        super().__init__()
        self.fc = _sn(nn.Linear(z_dim, 4 * ch * 2 * 2), sn)
        self.net = nn.Sequential(
            nn.BatchNorm2d(4 * ch),
            nn.ReLU(),
            _sn(nn.ConvTranspose2d(4 * ch, 2 * ch, 4, 2, 1), sn),
            nn.BatchNorm2d(2 * ch),
            nn.ReLU(),
            _sn(nn.ConvTranspose2d(2 * ch, ch, 4, 2, 1), sn),
            nn.BatchNorm2d(ch),
            nn.ReLU(),
            _sn(nn.Conv2d(ch, 1, 3, 1, 1), sn),
            nn.Tanh(),
        )
        self.ch = ch

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.net(self.fc(z).view(-1, 4 * self.ch, 2, 2))
        return y


class DCDiscriminator(nn.Module):
    """8x8 -> 4x4 -> 2x2 with strided convolutions (no pooling) and LeakyReLU, no BatchNorm."""

    def __init__(self, ch: int, sn: bool):
        super().__init__()
        act = nn.LeakyReLU(0.2)
        self.net = nn.Sequential(
            _sn(nn.Conv2d(1, ch, 3, 1, 1), sn),
            act,
            _sn(nn.Conv2d(ch, 2 * ch, 4, 2, 1), sn),
            act,
            _sn(nn.Conv2d(2 * ch, 4 * ch, 4, 2, 1), sn),
            act,
            nn.Flatten(),
            _sn(nn.Linear(4 * ch * 2 * 2, 1), sn),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.net(x)
        return y
