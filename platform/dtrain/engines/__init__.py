"""Engines: one implementation of the `dtrain.protocols.Engine` protocol per backend.

| engine | module | sharding | precision |
|---|---|---|---|
| `ddp` | `engines/ddp.py` | none (replicas) | torch.amp, one GradScaler per job |
| `deepspeed` | `engines/deepspeed.py` | ZeRO 0-3 | DeepSpeed's own (autocast for inputs) |
| `fsdp` | `engines/fsdp.py` | FSDP2, per block | FSDP's MixedPrecisionPolicy (bf16) |

Before an engine wraps a model, `dtrain.engines.blocks.prepare` applies activation checkpointing
and `torch.compile` to its blocks (in place).

`REGISTRY` is the one place that decides what combines: each engine class declares, in its
`validate(cfg)`, what it refuses (with why, in one line), and builds from one signature
(`build(spec, cfg, device=, plan=, total_steps=, precision=)`). `validate` runs before
torchrun starts (the CLI) and again in each rank (raw torchrun launches). A new engine
implements the protocol and gets a line in `REGISTRY`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
from typing import Iterator

import torch

from dtrain.config import Config
from dtrain.data import BatchPlan
from dtrain.engines import blocks
from dtrain.engines.ddp import DDPEngine
from dtrain.engines.deepspeed import DeepSpeedEngine
from dtrain.engines.norm import convert_sync_batchnorm
from dtrain.engines.precision import AmpPrecision
from dtrain.protocols import Engine, ModelSpec
from dtrain.runtime import distributed

REGISTRY: dict[str, str] = {
    "ddp": "dtrain.engines.ddp:DDPEngine",
    "deepspeed": "dtrain.engines.deepspeed:DeepSpeedEngine",
    "fsdp": "dtrain.engines.fsdp:FSDPEngine",
}
"""`engine=` name -> its class, imported when a job names it (`engine_class`): a DDP job
never imports FSDP2's checkpoint machinery, nor DeepSpeed."""


def engine_class(name: str) -> type[DDPEngine] | type[DeepSpeedEngine]:
    module, _, attr = REGISTRY[name].partition(":")
    cls: type[DDPEngine] | type[DeepSpeedEngine] = getattr(importlib.import_module(module), attr)
    return cls


def validate(cfg: Config) -> None:
    """What the recipe's engine refuses in it, as one ConfigError line, before any rank starts."""
    engine_class(cfg.engine).validate(cfg)


@contextlib.contextmanager
def evaluation_weights(engines: dict[str, Engine]) -> Iterator[None]:
    """Every engine's `evaluation_weights` at once (evaluation and model.pt)."""
    with contextlib.ExitStack() as stack:
        for engine in engines.values():
            stack.enter_context(engine.evaluation_weights())
        yield


def build_engines(
    cfg: Config, specs: dict[str, ModelSpec], device: torch.device, plan: BatchPlan, total_steps: int
) -> dict[str, Engine]:
    """One engine per model; the DDP engines share one precision object (one GradScaler,
    updated once per iteration)."""
    cls = engine_class(cfg.engine)
    precision = AmpPrecision(cfg.precision, device)
    engines: dict[str, Engine] = {}
    for name, spec in specs.items():
        module = spec.module
        if cfg.model.sync_bn and distributed.world_size() > 1:
            module = convert_sync_batchnorm(module, device)
        steps = math.ceil(total_steps * spec.optimizer_steps_per_step)
        blocks.prepare(module, spec.blocks, cfg.model.activation_checkpointing, cfg.compile, name)
        engines[name] = cls.build(
            dataclasses.replace(spec, module=module),
            cfg,
            device=device,
            plan=plan,
            total_steps=steps,
            precision=precision,
        )
    return engines
