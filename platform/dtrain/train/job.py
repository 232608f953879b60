"""A command on this rank (`dtrain train`, `dtrain check`): the launch environment, the
validated recipe, the process group, and every way out as one line and an exit code.

The commands share one skeleton (`run_on_ranks`): read the launcher's environment, load and
validate the recipe (before torchrun starts any rank, with `--nproc-per-node`), join the
process group, run the command's body, tear down. An error is explained in one line by the
first rank that meets it (`explain`); an unexpected one keeps its traceback, which
torchrun's `@record` carries to the agent's summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, NoReturn, Sequence

import torch

from dtrain import data
from dtrain.config import Config, redact
from dtrain.errors import BAD_INPUT, FAILED, Failure, shown
from dtrain.runtime import distributed, files, launch, preemption
from dtrain.runtime.environments import DistEnv
from dtrain.train import resume
from dtrain.train.config import load_config
from dtrain.train.config import validate as validate_job

log = logging.getLogger("dtrain")

Body = Callable[[Config, DistEnv, torch.device], int]
"""A command's work on this rank, once the process group is up; returns the exit code."""


def run_on_ranks(
    args: argparse.Namespace,
    command: Sequence[str],
    body: Body,
    validate: Callable[[], object] = lambda: None,
    relaunch: bool = True,
) -> NoReturn:
    env, cfg = prepare(args, command, validate, relaunch)
    device = join(env, cfg)
    code, clean = FAILED, False
    try:
        code, clean = body(cfg, env, device), True
    except BaseException as e:
        preemption.hold()  # torchrun's SIGTERM, sent once another rank has exited, must not cut this short
        # No barrier after an error: the other ranks may be inside a collective this rank will
        # never join. Exiting closes this rank's connections, which ends theirs promptly.
        line, code = explain(e, cfg)
        if line is None:
            raise  # a bug: let @record carry the traceback to torchrun's summary
        report(line, code, env.rank)
    finally:
        distributed.shutdown(clean)
    sys.exit(code)


def prepare(
    args: argparse.Namespace, command: Sequence[str], validate: Callable[[], object], relaunch: bool = True
) -> tuple[DistEnv, Config]:
    """This rank's launch environment and validated recipe (and `validate()`), or one line and
    exit 2; with --nproc-per-node in a plain process (and `relaunch`), this process becomes the
    torchrun agent of `command` on N ranks and exits with the job."""
    rank = 0
    try:
        env = distributed.read_env()
        rank = env.rank
        setup_logging(rank)
        cfg = load_config(args.recipe, [*args.overrides, *redact.private_overrides()])
        files.keep_private(cfg.private)  # before anything is written, and for the ranks torchrun starts
        restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0")
        if not cfg.resume and (restarted or resume.continues_this_job(Path(cfg.output_dir))):
            # torchrun restarted this job's workers: continue, do not start over.
            cfg.resume = "auto"
        data.plan_batches(cfg, args.nproc_per_node or env.world_size)
        validate_job(cfg)  # every refused combination, before torchrun starts any rank
        validate()
        moved = tuple(command[:1]) == ("train",) and env.launcher == "single" and resume.place(cfg, args.overrides)
    except Failure as e:
        fail(str(e), e.exit_code, rank)
    if relaunch and args.nproc_per_node and env.launcher == "single":
        # a password never on a command line; the folder chosen here, the same for every rank
        public, private = redact.portable([*args.overrides, *([f"output_dir={cfg.output_dir}"] if moved else [])])
        sys.exit(launch.run_torchrun(args.nproc_per_node, args.recipe, public, command, private))
    return env, cfg


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        format="dtrain: %(message)s" if rank == 0 else f"dtrain[rank {rank}]: %(message)s",
        level=logging.INFO if rank == 0 else logging.WARNING,
        stream=sys.stderr,
    )
    redact.redact_logs()


def join(env: DistEnv, cfg: Config) -> torch.device:
    """Join the process group (the device this rank uses), or one line naming the endpoint."""
    try:
        return distributed.init(env, cfg.train.collective_timeout_s)
    except Exception as e:  # rendezvous failures: name the endpoint, not a stack
        fail(
            f"cannot join the process group at {env.master_addr}:{env.master_port} as rank {env.rank} "
            f"of {env.world_size}: {files.first_line(e)}",
            FAILED,
            env.rank,
            every_rank=True,
        )


def explain(e: BaseException, cfg: Config) -> tuple[str | None, int]:
    """An exception on this rank as (the one line to show, exit code); (None, 1) for a bug."""
    if isinstance(e, Failure):
        return str(e), e.exit_code
    if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or a stop signal before or after the loop
        signum = getattr(e, "signum", None)
        return ("interrupted", 130) if signum is None else (f"stopped by signal {signum}", 128 + signum)
    if isinstance(e, SystemExit):
        return None, int(e.code or 0)
    if distributed.is_timeout(e):
        stuck = distributed.stuck_ranks()
        who = (
            f"rank(s) {distributed.named(stuck)} never joined it (hung or dead)"
            if stuck
            else "the rank that stalled could not be determined"
        )
        return (
            f"a collective waited longer than train.collective_timeout_s={cfg.train.collective_timeout_s:g}s: {who}",
            FAILED,
        )
    if distributed.is_peer_gone(e):
        return "", FAILED  # another rank failed first and said why (or died: torchrun names it)
    if isinstance(e, OSError):  # an unreadable file, a full disk: the path and the cause
        return f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", FAILED
    return None, FAILED


def report(line: str, code: int, rank: int) -> NoReturn:
    """Print this rank's error unless rank 0 reports the same one (deterministic errors hit
    every rank alike: one line, not one per rank), then exit with `code`."""
    if line and distributed.first_to_report(line):
        print(shown(redact.text(line), rank), file=sys.stderr, flush=True)
    if line:
        to_torchrun(shown(redact.text(line), rank))
    sys.exit(code)


def to_torchrun(line: str) -> None:
    """Under torchrun, the line goes into the error file its agent reads for this rank: the
    agent's failure summary, the last thing a user sees, then names the cause (torch's
    `@record` does the same for an unexpected exception's traceback)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError):
            # The layout torch's `record` writes; the agent shows `py_callstack` as the traceback.
            info = {"py_callstack": line, "timestamp": str(int(time.time()))}
            Path(path).write_text(json.dumps({"message": {"message": line, "extraInfo": info}}))


def fail(msg: str, code: int = BAD_INPUT, rank: int = 0, every_rank: bool = False) -> NoReturn:
    """One line, from rank 0 only when every rank hits the same (deterministic) problem."""
    if rank == 0 or every_rank:
        print(shown(redact.text(msg), rank), file=sys.stderr, flush=True)
    to_torchrun(shown(redact.text(msg), rank))
    sys.exit(code)
