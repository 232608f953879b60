"""`model.init`: one initialisation scheme for every convolution and linear layer of a model,
applied after the task builds it (a task's own init is `default`, left as it is).

- kaiming: He et al. 2015, normal with std = sqrt(2 / fan_in) (ReLU gain), for ReLU networks;
- xavier: Glorot & Bengio 2010, uniform in +-sqrt(6 / (fan_in + fan_out)), for tanh / linear;
biases start at zero. What follows the scheme (a ResNet's zero-initialised last BatchNorm of
each residual branch, a classifier's bias from the class prior) is the task's
`init_weights`, which runs after it.
"""

from __future__ import annotations

import torch.nn as nn

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def initialize(model: nn.Module, scheme: str) -> None:
    if scheme == "default":
        return
    for m in model.modules():
        if not isinstance(m, LAYERS):
            continue
        if scheme == "kaiming":
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif scheme == "xavier":
            nn.init.xavier_uniform_(m.weight)
        else:
            raise ValueError(f"unknown init scheme {scheme!r}")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
