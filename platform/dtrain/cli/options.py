"""Options several commands share: a recipe with overrides that can start itself under
torchrun, the comparison's options, a run folder that may be trusted."""

from __future__ import annotations

import argparse
from typing import Any, Callable


def recipe_command(
    sub: Any, name: str, run: Callable[[argparse.Namespace], object], help: str, nproc_help: str
) -> argparse.ArgumentParser:
    """A subcommand that takes a recipe and overrides, and can start itself under torchrun."""
    t: argparse.ArgumentParser = sub.add_parser(name, help=help)
    t.add_argument("recipe", help="YAML recipe, e.g. recipes/cnn_digits.yaml")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optim.lr=0.05")
    t.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=0, metavar="N", help=nproc_help)
    # The deepspeed launcher may also put --local_rank after the subcommand; the rank comes from the env.
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    t.set_defaults(handler=run)
    return t


def compare_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--metric", default="eval/accuracy", help="eval metric to compare (default eval/accuracy)")
    c.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="how much worse than the baseline a final metric may be (default 0.01 = 1 point)",
    )
    c.add_argument(
        "--target",
        type=float,
        default=None,
        help="metric value for 'time to target' (default: baseline final minus the tolerance)",
    )
    c.add_argument("--fail-on-gap", action="store_true", help="exit 1 when a run is outside the tolerance")


def trust_option(
    p: argparse.ArgumentParser, what: str = "the run folder is yours: import the task module its config.yaml names"
) -> None:
    p.add_argument("--trust", action="store_true", help=what)


def mixing_options(p: argparse.ArgumentParser, output: str) -> None:
    """A command that writes a model mixed from runs' weights."""
    p.add_argument("--output", required=True, help=output)
    p.add_argument(
        "--bn-batches",
        type=int,
        default=100,
        help="training batches to recompute BatchNorm statistics on for a mixed model (0: mix them too)",
    )
    trust_option(
        p, "the run folders are yours: import the task module their config.yaml names, read DeepSpeed checkpoints"
    )


def floats(key: str, text: str) -> list[float]:
    from dtrain.errors import ConfigError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(key, text, "must be comma-separated numbers") from None
