"""`dtrain average CHECKPOINTS... --output FILE`: checkpoints of one run averaged into a plain
model, BatchNorm statistics refreshed (`dtrain.postrun.average`)."""

from __future__ import annotations

import argparse
from typing import Any

from dtrain.cli.options import trust_option


def add(sub: Any) -> None:
    a = sub.add_parser("average", help="average checkpoints of one run into a plain model.pt")
    a.add_argument("checkpoints", nargs="+", help="step_* checkpoint folders of one run")
    a.add_argument("--output", required=True, help="the averaged state_dict: a .safetensors file, or a model.pt")
    a.add_argument(
        "--bn-batches",
        type=int,
        default=100,
        help="training batches to recompute BatchNorm statistics on (0: keep the averaged ones)",
    )
    trust_option(
        a,
        "the run folders are yours: import the task module their config.yaml names, read DeepSpeed checkpoints",
    )
    a.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from dtrain.postrun.average import average

    folders = [Path(c) for c in args.checkpoints]
    cfg, metrics = average(folders, Path(args.output), args.bn_batches, args.trust)
    print(
        f"average: {len(folders)} checkpoint(s) of {cfg.output_dir} -> {args.output}"
        + (" | eval " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()) if metrics else "")
    )
