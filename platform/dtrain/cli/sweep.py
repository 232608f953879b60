"""`dtrain sweep-world-sizes RECIPE`: train the recipe at several world sizes via torchrun into one
experiment, then compare them (`dtrain.studies.sweep`)."""

from __future__ import annotations

import argparse
from typing import Any

from dtrain.cli import compare
from dtrain.cli.options import compare_options


def add(sub: Any) -> None:
    w = sub.add_parser("sweep-world-sizes", help="train a recipe at several world sizes via torchrun, then compare")
    w.add_argument("recipe")
    w.add_argument("overrides", nargs="*")
    w.add_argument("--world-sizes", default="1,2", help="comma-separated rank counts (default 1,2)")
    w.add_argument(
        "--keep",
        choices=["global", "per-rank"],
        default="global",
        help="keep the recipe's global batch (strong scaling, default) or its per-rank batch at the "
        "smallest world size (weak scaling: the global batch and the LR grow with the ranks)",
    )
    w.add_argument("--output", default="", help="comparison folder (default OUTPUT_DIR/comparison)")
    compare_options(w)
    w.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from dtrain import tracking
    from dtrain.studies import sweep

    cfg, run_ids = sweep.sweep(args.recipe, args.overrides, sweep.parse_sizes(args.world_sizes), args.keep)
    args.experiment, args.runs, args.uri = cfg.tracking.experiment, run_ids, tracking.resolve_uri(cfg.tracking.uri)
    args.output = args.output or str(Path(cfg.output_dir) / "comparison")
    compare.run(args)
