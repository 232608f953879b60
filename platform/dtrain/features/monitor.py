"""Layer health during training (`monitor.every`): the in-training counterparts of `dtrain check`.

On a monitored step, for each model:
- `grad_norm/<weight>`: the L2 norm of each weight's gradient (reduced, unscaled, before
  clipping), read in the engine's `on_gradients` hook;
- `update_ratio/<weight>`: ||w_after - w_before|| / ||w_before||, the step's relative change
  (about 1e-3 is healthy; far above, the LR is too high; far below, too low);
- `act_mean/<module>`, `act_std/<module>`, `dead_frac/<module>`: the outputs of activation
  modules and of the blocks of Sequential / ModuleList containers on this rank's micro-batches;
  a unit is dead when it is <= 0 for every sample of the micro-batch (ReLU outputs and blocks
  that end in one);
- `bn_collapsed_frac`: the share of BatchNorm layers whose running variance collapsed (over
  half of its channels below 1e-5);
and warnings when a weight's gradient norm is below `monitor.vanish_below` or the global norm
above `monitor.explode_above`. Weights are parameters of 2 or more dimensions (biases and norm
scales are left out). Off (`every: 0`) it is not in the loop at all.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from dtrain.config.schema import non_negative, positive
from dtrain.protocols import Engine, Feature, Run, StepOutput

log = logging.getLogger("dtrain")


@dataclass
class MonitorConfig:
    every: int = 0
    """Every N optimizer steps, log layer health to MLflow (`monitor/...`): per-layer gradient
    norm and update-to-weight ratio, activation mean / std and dead-ReLU fraction, BatchNorm
    layers whose running variance collapsed; warn when gradients vanish or explode. 0: off,
    at no cost."""
    vanish_below: float = 1e-7
    """Warn when a weight's gradient norm is below this (vanishing gradients)."""
    explode_above: float = 1e3
    """Warn when the global gradient norm is above this (exploding gradients)."""

    def validate(self) -> None:
        non_negative(self, "monitor", "every", "vanish_below")
        positive(self, "monitor", "explode_above")


ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Mish)
RECTIFIERS = (nn.ReLU, nn.ReLU6)
COLLAPSED_VAR = 1e-5


def watched_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Activation modules, and the blocks held by Sequential / ModuleList containers."""
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, ACTIVATIONS):
            out[name] = m
        elif isinstance(m, (nn.Sequential, nn.ModuleList)):
            out |= {f"{name}.{k}" if name else k: c for k, c in m.named_children() if list(c.children())}
    return out


class Monitor(Feature):
    key, config_class, order = "monitor", MonitorConfig, 90  # reads the weights the others left
    matrix = {"monitor": ("monitor.every=2",)}

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return bool(cfg.monitor.every)

    def __init__(self, run: Run):
        self.cfg: MonitorConfig = run.cfg.monitor
        self.engines = run.engines
        self.metrics: dict[str, float] = {}
        self.hooks: list[Any] = []
        self.before: dict[str, dict[str, torch.Tensor]] = {}
        self.grads: dict[str, dict[str, float]] = {}

    def due(self, step: int) -> bool:
        """Whether the step numbered `step` (counting from 1) is monitored."""
        return step % self.cfg.every == 0

    def setup(self, run: Run) -> None:
        if self.due(run.step + 1):
            self._arm()

    def after_step(self, run: Run, out: StepOutput) -> None:
        if self.hooks or self.before:
            self._disarm()
            for name, engine in self.engines.items():
                self._weights(self._prefix(name), engine, self.before[name], self.grads[name], run.step)
            self._batch_norms()
            run.log({f"monitor/{k}": v for k, v in self.metrics.items()})
            self.before = {}
        if self.due(run.step + 1):
            self._arm()

    def end(self, run: Run, status: str) -> None:
        self._disarm()

    def _prefix(self, name: str) -> str:
        return f"{name}/" if len(self.engines) > 1 else ""

    def _arm(self) -> None:
        """Before a monitored step: activations are kept by forward hooks, the weights copied
        (for the update ratio), and the engines hand over the gradients once final."""
        self.metrics = {}
        for name, engine in self.engines.items():
            self.hooks += [
                m.register_forward_hook(self._activation_hook(self._prefix(name) + n, m))
                for n, m in watched_modules(engine.module).items()
            ]
            self.before[name] = {n: p.detach().float().clone() for n, p in engine.full_params().items() if p.dim() >= 2}
            self.grads[name] = {}
            engine.on_gradients = self._grads_hook(engine, self.grads[name])

    def _disarm(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for engine in self.engines.values():
            engine.on_gradients = None

    def _activation_hook(self, name: str, module: nn.Module) -> Any:
        def hook(m: nn.Module, args: Any, out: Any) -> None:
            # (an evaluation between arming and the step runs in eval mode: not the step's activations)
            if not m.training or not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.dim() < 2:
                return
            x = out.detach().float()
            self.metrics[f"act_mean/{name}"] = float(x.mean())
            self.metrics[f"act_std/{name}"] = float(x.std())
            if isinstance(module, RECTIFIERS) or bool((x >= 0).all()):
                self.metrics[f"dead_frac/{name}"] = float((x <= 0).all(dim=0).float().mean())

        return hook

    @staticmethod
    def _grads_hook(engine: Engine, into: dict[str, float]) -> Any:
        def hook() -> None:
            into.update({n: float(g.float().norm()) for n, g in engine.full_grads().items() if g.dim() >= 2})

        return hook

    def _weights(
        self, prefix: str, engine: Engine, before: dict[str, torch.Tensor], grads: dict[str, float], step: int
    ) -> None:
        after = engine.full_params()
        ratios = {n: float((after[n].float() - w).norm() / w.norm().clamp(min=1e-12)) for n, w in before.items()}
        self.metrics |= {f"{prefix}grad_norm/{n}": v for n, v in grads.items()}
        self.metrics |= {f"{prefix}update_ratio/{n}": v for n, v in ratios.items()}
        if ratios:
            self.metrics[f"{prefix}update_ratio_median"] = float(torch.tensor(list(ratios.values())).median())
        vanished = [n for n, v in grads.items() if v < self.cfg.vanish_below]
        total = math.sqrt(sum(v * v for v in grads.values()))
        if vanished:
            log.warning(
                "monitor: step %d: vanishing gradients in %d weight(s) (norm < %g), first %s",
                step,
                len(vanished),
                self.cfg.vanish_below,
                prefix + vanished[0],
            )
        if total > self.cfg.explode_above:
            log.warning(
                "monitor: step %d: exploding gradients: global norm %.3g > monitor.explode_above=%g",
                step,
                total,
                self.cfg.explode_above,
            )

    def _batch_norms(self) -> None:
        variances = [
            m.running_var
            for e in self.engines.values()
            for m in e.module.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_var is not None
        ]
        if variances:
            collapsed = sum(float((v < COLLAPSED_VAR).float().mean()) > 0.5 for v in variances)
            self.metrics["bn_collapsed_frac"] = collapsed / len(variances)
