"""`dtrain soup RUNS... --output DIR`: runs fine-tuned from one start combined by averaging their
weights (uniform, greedy or weighted; `dtrain.postrun.soup`)."""

from __future__ import annotations

import argparse
from typing import Any

from dtrain.cli.options import floats, mixing_options


def add(sub: Any) -> None:
    s = sub.add_parser("soup", help="combine runs fine-tuned from one start by averaging their weights")
    s.add_argument("runs", nargs="+", help="finished runs' output_dirs or step_* checkpoint folders (one architecture)")
    s.add_argument(
        "--method",
        choices=["uniform", "greedy", "weighted"],
        default="greedy",
        help="uniform mean; greedy: add a run only if the held-out score does not drop (default); "
        "weighted: by training-set size (FedAvg) or --weights",
    )
    s.add_argument("--weights", default="", help="comma-separated weights for --method weighted")
    mixing_options(s, "the soup's run folder (model.safetensors, config.yaml, soup.json)")
    s.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from dtrain.postrun import soup

    out = soup.soup(
        args.runs, args.method, Path(args.output), args.bn_batches, floats("--weights", args.weights), args.trust
    )
    m = out["metric"]
    parts = ", ".join(f"{Path(i['run']).name} {i[m]:.4g} (x{i['weight']:.2f})" for i in out["ingredients"])
    print(f"soup ({args.method}): {m} {out['soup'][m]:.4g} from {parts} -> {args.output}")
