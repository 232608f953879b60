"""`dtrain train RECIPE [overrides] [--nproc-per-node N | --ray-workers N]`: `fit` on this rank,
on N ranks via torchrun, or as a Ray Train job (`dtrain.train.ray_job`)."""

from __future__ import annotations

import argparse
from typing import Any

from dtrain.cli.options import recipe_command


def add(sub: Any) -> None:
    t = recipe_command(
        sub,
        "train",
        run,
        "train a recipe (1 process, or under torchrun / deepspeed / accelerate / srun, or as a Ray Train job)",
        "validate, then run N ranks on this machine via torchrun (its stores on loopback)",
    )
    t.add_argument(
        "--ray-workers",
        type=int,
        default=0,
        metavar="N",
        help="run as a Ray Train job of N workers (ray.train.torch.TorchTrainer; the ray extra)",
    )
    t.add_argument("--ray-address", default="", help="the Ray cluster to join (e.g. auto); default: a local instance")
    t.add_argument(
        "--ray-max-failures",
        type=int,
        default=0,
        metavar="K",
        help="worker-group restarts Ray may make "
        "(FailureConfig.max_failures); each continues from the newest checkpoint",
    )
    t.add_argument("--ray-gpu", action="store_true", help="one GPU per Ray worker (NCCL)")


def run(args: argparse.Namespace) -> None:
    import torch

    from dtrain.config import Config
    from dtrain.runtime import allocator, preemption
    from dtrain.runtime.environments import DistEnv
    from dtrain.train.fit import fit
    from dtrain.train.job import run_on_ranks

    if args.ray_workers:  # as a Ray Train job: this process only submits it
        from dtrain.train import ray_job

        return ray_job.launch(args)
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
