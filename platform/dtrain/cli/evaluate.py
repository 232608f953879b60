"""`dtrain evaluate RUN [overrides]`: a run's model on its task's held-out set, the recipe changed
by overrides (e.g. an earlier task's data; `dtrain.postrun.soup`)."""

from __future__ import annotations

import argparse
from typing import Any

from dtrain.cli.options import trust_option


def add(sub: Any) -> None:
    e = sub.add_parser("evaluate", help="a run's model on its task's held-out set, the recipe changed by overrides")
    e.add_argument("run", help="a finished run's output_dir or a step_* checkpoint folder")
    e.add_argument("overrides", nargs="*", help="e.g. data.classes=[0,1,2,3,4] (an earlier task's data)")
    trust_option(e, "the run folder is yours: import the task module its config.yaml names, read DeepSpeed checkpoints")
    e.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from dtrain.postrun import soup

    metrics = soup.evaluate(args.run, args.overrides, args.trust)
    print(f"evaluate {args.run}" + "".join(f" {k}={v:.6g}" for k, v in metrics.items()))
