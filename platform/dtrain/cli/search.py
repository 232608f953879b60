"""`dtrain search RECIPE --space SPACE.yaml`: an Optuna study over the recipe; trials are dtrain
runs, MLflow child runs of one parent (`dtrain.studies.search`)."""

from __future__ import annotations

import argparse
from typing import Any, Literal

from dtrain.cli.options import recipe_command

MAXIMIZED = ("accuracy", "precision", "recall", "coverage", "density")
"""Metrics a named `--metric` maximises when `--direction` is not given."""


def add(sub: Any) -> None:
    q = recipe_command(
        sub,
        "search",
        run,
        "hyperparameter search with Optuna: trials are dtrain runs, MLflow child runs of one parent",
        "run each trial on N ranks via torchrun",
    )
    q.add_argument("--space", required=True, help="YAML: recipe key -> {type: float|int|categorical, ...}")
    q.add_argument("--trials", type=int, default=10, help="finished (complete or pruned) trials the study needs")
    q.add_argument(
        "--max-failures",
        type=int,
        default=3,
        help="failed trials after which this worker stops, "
        "exit 1 (default 3; failed trials never count toward --trials)",
    )
    q.add_argument(
        "--stop-grace",
        type=float,
        default=60.0,
        help="seconds a stopped search gives its running trial to checkpoint (SIGTERM) before killing it (default 60)",
    )
    q.add_argument(
        "--metric",
        default="",
        help="eval metric to optimise (default: the task's headline "
        "metric, e.g. eval/accuracy for cnn, eval/loss for transformer)",
    )
    q.add_argument("--direction", choices=["maximize", "minimize"], default=None)
    q.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe")
    q.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median")
    q.add_argument(
        "--prune-startup", type=int, default=3, help="completed trials before the median pruner prunes any (default 3)"
    )
    q.add_argument(
        "--prune-warmup", type=int, default=1, help="a trial's first evaluations that never prune it (default 1)"
    )
    q.add_argument(
        "--storage",
        default="",
        help="Optuna storage URL (default: optuna.db beside the MLflow "
        "store; postgresql+psycopg://... for several machines)",
    )
    q.add_argument("--study", default="", help="study name (default RECIPE-search); the same name continues it")
    q.add_argument("--output", default="", help="folder for trials, search.json, best.yaml, plots")


def objective(args: argparse.Namespace, headline: str, higher: bool) -> tuple[str, Literal["maximize", "minimize"]]:
    """The metric to optimise (`--metric`, else the task's headline) and which way."""
    metric = args.metric or f"eval/{headline}"
    named = metric.removeprefix("eval/")
    maximize = higher if named == headline else named in MAXIMIZED
    return metric, args.direction or ("maximize" if maximize else "minimize")


def run(args: argparse.Namespace) -> None:
    import signal
    from pathlib import Path

    from dtrain.errors import ConfigError, Failure
    from dtrain.studies import search
    from dtrain.tasks import get_task
    from dtrain.train.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    for flag, least in (("prune_startup", 0), ("prune_warmup", 0), ("max_failures", 1)):
        if getattr(args, flag) < least:
            raise ConfigError(f"--{flag.replace('_', '-')}", getattr(args, flag), f"must be >= {least}")
    metric, direction = objective(args, *get_task(cfg.task)(cfg).headline_metric())
    a = search.SearchArgs(
        args.recipe,
        args.overrides,
        Path(args.space),
        args.trials,
        metric,
        direction,
        args.sampler,
        args.pruner,
        args.storage or search.default_storage(cfg),
        args.study or f"{cfg.recipe}-search",
        Path(args.output or f"runs/{cfg.recipe}-search"),
        args.nproc_per_node,
        args.max_failures,
        args.prune_startup,
        args.prune_warmup,
        args.stop_grace,
    )

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signum)

    signal.signal(signal.SIGTERM, stop)  # the running trial is stopped with the search
    try:
        summary = search.search(a)
    except KeyboardInterrupt:
        raise Failure("search stopped; `dtrain search` with the same --study and --storage continues it", 130) from None
    best = summary["best"]
    print(
        f"search: {len(summary['trials'])} trials in study {a.study!r}; "
        + (
            f"best {a.metric} {best['value']:.4g} (trial {best['number']}): {a.output / 'best.yaml'}"
            if best
            else "no trial completed"
        )
    )
