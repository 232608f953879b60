"""`dtrain compare`: single- vs multi-GPU convergence, read back from MLflow (`dtrain.tracking.compare`)."""

from __future__ import annotations

import argparse
from typing import Any

from dtrain.cli.options import compare_options


def add(sub: Any) -> None:
    c = sub.add_parser("compare", help="single- vs multi-GPU convergence, read back from MLflow")
    c.add_argument("--experiment", help="MLflow experiment whose runs to compare")
    c.add_argument("--runs", nargs="+", help="compare exactly these run ids")
    c.add_argument("--uri", default="", help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    c.add_argument("--output", required=True, help="folder for comparison.png and comparison.json")
    compare_options(c)
    c.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    import sys
    from pathlib import Path

    from dtrain import tracking
    from dtrain.errors import Failure
    from dtrain.tracking import compare

    if not args.experiment and not args.runs:
        raise Failure("compare: give --experiment NAME or --runs ID [ID ...]")
    report = compare.compare(
        tracking.resolve_uri(args.uri),
        args.experiment,
        args.runs or [],
        args.metric,
        Path(args.output),
        args.tolerance,
        args.target,
    )
    print(report["table"])
    print("\n".join(compare.verdict_lines(report["verdict"])))
    print(
        f"wrote {Path(args.output) / 'comparison.png'} and comparison.json"
        + (f"; MLflow comparison run {report['comparison_run_id']}" if report.get("comparison_run_id") else "")
    )
    if args.fail_on_gap and not report["verdict"]["ok"]:
        sys.exit(1)
