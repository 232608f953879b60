"""`dtrain train RECIPE [overrides] [--nproc-per-node N]`: `fit` on this rank, or on N ranks via
torchrun (`--ray-workers N`: `dtrain.train.ray_job`)."""

from __future__ import annotations

import argparse
from typing import NoReturn

import torch

from dtrain.config import Config
from dtrain.runtime import allocator, preemption
from dtrain.runtime.environments import DistEnv
from dtrain.train.fit import fit
from dtrain.train.job import run_on_ranks


def train(args: argparse.Namespace) -> NoReturn:
    """`dtrain train`: `fit` on this rank (or on N ranks via torchrun)."""
    allocator.tune()
    # SIGTERM / SIGUSR1 (preemption, torchrun stopping its workers) end in a checkpoint at the
    # next step boundary inside the loop, and in an exception elsewhere, so `finally` blocks
    # still mark the MLflow run KILLED instead of leaving it RUNNING.
    preemption.install()

    def body(cfg: Config, env: DistEnv, device: torch.device) -> int:
        outcome = fit(cfg, env, device)
        # Preempted: every rank stopped after the same step and checkpointed. Non-zero: the job
        # is not done, so Kubernetes / SLURM / torchrun run it again.
        return 128 + outcome.signum if outcome.status == "preempted" else 0

    run_on_ranks(args, ("train",), body)
