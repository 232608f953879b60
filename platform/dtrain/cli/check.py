"""`dtrain check RECIPE [--only NAMES] [--nproc-per-node N]`: the sanity checks of
`dtrain.studies.check`, in this process or on N ranks; `--only invariance` runs here and starts
its N ranks itself, which record (`--trace-to`)."""

from __future__ import annotations

import argparse
from typing import Any

from dtrain.cli.options import recipe_command


def add(sub: Any) -> None:
    k = recipe_command(
        sub,
        "check",
        run,
        "sanity checks before a long run: init loss, overfit a batch, batch "
        "independence, gradcheck, LR range, data, distributed (exit 1 on a FAIL)",
        "run on N ranks of this machine via torchrun (the distributed check needs 2 or more)",
    )
    k.add_argument(
        "--only",
        default="",
        help="comma-separated check names (default: all but invariance, which "
        "is asked for alone: --only invariance --nproc-per-node N)",
    )
    k.add_argument("--trace-to", default="", help=argparse.SUPPRESS)  # invariance's own N ranks record here


def run(args: argparse.Namespace) -> None:
    from dtrain.studies import check
    from dtrain.studies.check import trace
    from dtrain.train.job import run_on_ranks

    if args.trace_to:
        run_on_ranks(args, (), lambda cfg, env, device: trace.trace_rank(cfg, device, args.trace_to))
    if check.select_quietly(args.only) == ["invariance"]:
        run_on_ranks(
            args,
            (),
            lambda cfg, env, device: check.run_invariance(
                cfg, device, args.recipe, args.overrides, args.nproc_per_node
            ),
            lambda: invariance_launch(args),
            relaunch=False,
        )
    run_on_ranks(
        args,
        ("check", f"--only={args.only}"),
        lambda cfg, env, device: check.run(cfg, device, args.only),
        lambda: check.select(args.only),
    )


def invariance_launch(args: argparse.Namespace) -> None:
    """Where `--only invariance` can run: a plain process that can start N >= 2 ranks."""
    from dtrain.errors import ConfigError
    from dtrain.runtime import distributed

    if distributed.read_env().launcher != "single":
        raise ConfigError(
            "--only",
            "invariance",
            "runs a 1-process reference and starts its N ranks itself: run "
            "`dtrain check RECIPE --only invariance --nproc-per-node N` from a shell, not under a launcher",
        )
    if args.nproc_per_node < 2:
        raise ConfigError(
            "--nproc-per-node", args.nproc_per_node, "the world size to compare with 1 process: 2 or more"
        )
