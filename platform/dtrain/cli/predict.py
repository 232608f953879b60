"""`dtrain predict RUN INPUTS.npy --output OUT.npy`: a finished run's predictions for raw inputs
(`dtrain.postrun.predict`; in Python, `dtrain.load(run)`)."""

from __future__ import annotations

import argparse
from typing import Any

from dtrain.cli.options import trust_option

# What each task dtrain ships takes and gives (its `predict`); a task of your own: its predict's docstring.
TASKS = """inputs -> outputs, by task:
  cnn                         images (N, C, H, W), pixels as the data holds them -> class probabilities (N, classes)
  transformer                 texts of one length, or character ids (N, T) -> next-character probabilities (N, T, vocab)
  hf_causal_lm                texts (the run's saved tokenizer) -> next-token probabilities after each text (N, vocab);
                              token ids (N, T) -> after each position (N, T, vocab)
  hf_sequence_classification  texts, or token ids (N, T) -> class probabilities (N, classes)
  gan                         latent vectors (N, z_dim) -> samples (digits (N, 1, 8, 8) in [-1, 1], or 2-D points)
"""


def add(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="a finished run's predictions for a .npy of inputs",
        epilog=TASKS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", help="the run's output_dir (config.yaml, model.safetensors, preprocessing.safetensors)")
    p.add_argument("inputs", help="a .npy array (N, ...) of raw inputs, or of strings for a task that reads text")
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
