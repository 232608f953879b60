"""`dtrain predict RUN INPUTS.npy --output OUT.npy`: a finished run's predictions for raw inputs
(`dtrain.postrun.predict`; in Python, `dtrain.load(run)`)."""

from __future__ import annotations

import argparse
from typing import Any

from dtrain.cli.options import trust_option


def add(sub: Any) -> None:
    p = sub.add_parser("predict", help="a finished run's predictions for a .npy of inputs")
    p.add_argument("run", help="the run's output_dir (config.yaml, model.safetensors, preprocessing.safetensors)")
    p.add_argument("inputs", help="a .npy array (N, ...) of raw inputs, as the task's predict() documents")
    p.add_argument("--output", required=True, help="where the .npy of outputs goes (e.g. class probabilities)")
    p.add_argument("--batch-size", type=int, default=256)
    trust_option(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from dtrain.errors import ConfigError
    from dtrain.postrun.predict import predict_file

    if args.batch_size < 1:
        raise ConfigError("--batch-size", args.batch_size, "must be >= 1")
    print(predict_file(args.run, Path(args.inputs), Path(args.output), args.batch_size, args.trust))
