"""`dtrain` command line: the parser, and the one place an error becomes a line and an exit code.

Each command is a module of `dtrain.cli` with `add(subparsers)` (its options) and `run(args)`
(its body, which imports what it needs when it runs: `dtrain --version`, `--help` and a bad
command line answer in a fraction of a second, before torch is imported). A new command is a new
module named in `COMMANDS`.

Bad input ends with one line on stderr and a non-zero exit, never a traceback: exit 2 for a bad
recipe, override or launch environment, 1 when the work fails (`dtrain.errors`). `train` and
`check` run on ranks (`dtrain.train.job`); the others in this process.
"""

from __future__ import annotations

import argparse
import logging
import sys

import dtrain
from dtrain.cli import (
    average,
    check,
    compare,
    evaluate,
    interpolate,
    keys,
    pack,
    predict,
    prepare_text,
    sample,
    search,
    soup,
    sweep,
    train,
)
from dtrain.config import redact
from dtrain.errors import Failure, shown
from dtrain.runtime import files

COMMANDS = (
    train,
    check,
    search,
    compare,
    sweep,
    keys,
    average,
    soup,
    interpolate,
    evaluate,
    prepare_text,
    predict,
    sample,
    pack,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtrain", description=(dtrain.__doc__ or "").split("\n")[0])
    p.add_argument("--version", action="version", version=f"dtrain {dtrain.__version__}")
    # The deepspeed launcher puts --local_rank=N before the subcommand (`-m dtrain --local_rank=0 train`).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as `dtrain` reads it, or argparse's one line and exit 2."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`train r.yaml --nproc-per-node 2 optim.lr=0.1`).
    unknown = [x for x in extra if "=" not in x or x.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    args = parse(argv)
    for override in getattr(args, "overrides", []):
        redact.text(override)  # a password an override holds is masked wherever it turns up
    logging.basicConfig(format="dtrain: %(message)s", level=logging.INFO, stream=sys.stderr)
    redact.redact_logs()
    files.keep_private()  # what a command writes is its user's (a run's `private: false` relaxes it)
    try:
        # @record writes an unexpected exception of this rank to torchrun's error file, so the
        # agent's failure summary shows the failing rank's traceback rather than "exitcode 1".
        record(args.handler)(args)
    except Failure as e:
        print(shown(redact.text(str(e))), file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
