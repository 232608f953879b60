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
scales are left out). Off (`every: 0`) the loop pays one integer comparison per step.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator

import torch
import torch.nn as nn

from dtrain.config import MonitorConfig
from dtrain.protocols import Engine

log = logging.getLogger("dtrain")

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


class Monitor:
    def __init__(self, cfg: MonitorConfig, engines: dict[str, Engine]):
        self.cfg, self.engines = cfg, engines
        self.metrics: dict[str, float] = {}

    def due(self, step: int) -> bool:
        """Whether the step about to run (number `step`, counting from 1) is monitored."""
        return self.cfg.every > 0 and step % self.cfg.every == 0

    @contextlib.contextmanager
    def watch(self, step: int) -> Iterator[None]:
        """Around one training step: collects `self.metrics` when the step is monitored."""
        if not self.due(step):
            yield
            return
        self.metrics = {}
        hooks: list[Any] = []
        before: dict[str, dict[str, torch.Tensor]] = {}
        grads: dict[str, dict[str, float]] = {}
        for name, engine in self.engines.items():
            prefix = f"{name}/" if len(self.engines) > 1 else ""
            hooks += [m.register_forward_hook(self._activation_hook(prefix + n, m))
                      for n, m in watched_modules(engine.module).items()]
            before[name] = {n: p.detach().float().clone() for n, p in engine.full_params().items() if p.dim() >= 2}
            grads[name] = {}
            engine.on_gradients = self._grads_hook(engine, grads[name])
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            for engine in self.engines.values():
                engine.on_gradients = None
        for name, engine in self.engines.items():
            self._weights(f"{name}/" if len(self.engines) > 1 else "", engine, before[name], grads[name], step)
        self._batch_norms()

    def _activation_hook(self, name: str, module: nn.Module) -> Any:
        def hook(m: nn.Module, args: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.dim() < 2:
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

    def _weights(self, prefix: str, engine: Engine, before: dict[str, torch.Tensor], grads: dict[str, float],
                 step: int) -> None:
        after = engine.full_params()
        ratios = {n: float((after[n].float() - w).norm() / w.norm().clamp(min=1e-12)) for n, w in before.items()}
        self.metrics |= {f"{prefix}grad_norm/{n}": v for n, v in grads.items()}
        self.metrics |= {f"{prefix}update_ratio/{n}": v for n, v in ratios.items()}
        if ratios:
            self.metrics[f"{prefix}update_ratio_median"] = float(torch.tensor(list(ratios.values())).median())
        vanished = [n for n, v in grads.items() if v < self.cfg.vanish_below]
        total = math.sqrt(sum(v * v for v in grads.values()))
        if vanished:
            log.warning("monitor: step %d: vanishing gradients in %d weight(s) (norm < %g), first %s", step,
                        len(vanished), self.cfg.vanish_below, prefix + vanished[0])
        if total > self.cfg.explode_above:
            log.warning("monitor: step %d: exploding gradients: global norm %.3g > monitor.explode_above=%g",
                        step, total, self.cfg.explode_above)

    def _batch_norms(self) -> None:
        variances = [m.running_var for e in self.engines.values() for m in e.module.modules()
                     if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_var is not None]
        if variances:
            collapsed = sum(float((v < COLLAPSED_VAR).float().mean()) > 0.5 for v in variances)
            self.metrics["bn_collapsed_frac"] = collapsed / len(variances)
