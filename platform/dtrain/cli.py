"""`dtrain` command line: train, check, search, compare, sweep-world-sizes, sample.

Bad input ends with one line on stderr and a non-zero exit, never a traceback:
exit 2 for a bad recipe, override or launch environment; 1 when training fails.
Each command imports the torch-side modules it needs when it runs (only `config` and
`fileio`, which import no torch, load with this module), so `dtrain --version`, `--help` and
a bad command line answer in a fraction of a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, NoReturn, Sequence

import dtrain
from dtrain.config import Config, ConfigError
from dtrain.environments import DistEnv

if TYPE_CHECKING:
    import torch
from dtrain.fileio import first_line

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _setup_logging(rank: int) -> None:
    logging.basicConfig(format="dtrain: %(message)s" if rank == 0 else f"dtrain[rank {rank}]: %(message)s",
                        level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr)


def _fail(msg: str, code: int, rank: int = 0, every_rank: bool = False) -> NoReturn:
    """One line, from rank 0 only when every rank hits the same (deterministic) problem."""
    if rank == 0 or every_rank:
        prefix = "dtrain: error: " if rank == 0 else f"dtrain[rank {rank}]: error: "
        print(prefix + msg, file=sys.stderr, flush=True)
    sys.exit(code)


def _train_config(args: argparse.Namespace, rank: int, world_size: int) -> Config:
    """The recipe with its overrides, validated (also against the world size), or exit 2."""
    from dtrain import data, engines
    from dtrain.tasks import load_config

    try:
        cfg = load_config(args.recipe, args.overrides)
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0") and not cfg.resume:
            # torchrun restarted the workers after a failure: continue, do not start over.
            cfg.resume = "auto"
        data.plan_batches(cfg, world_size)
        engines.validate(cfg)  # every refused combination, before torchrun starts any rank
    except ConfigError as e:
        _fail(str(e), EXIT_BAD_INPUT, rank)
    return cfg


def _launch(args: argparse.Namespace, command: Sequence[str],
            validate: Callable[[], object] = lambda: None) -> tuple[DistEnv, Config]:
    """This rank's launch environment and validated recipe (and `validate()`), or one line and
    exit 2; with --nproc-per-node in a plain process, torchrun replaces this process to run
    `command` on N ranks."""
    from dtrain import distributed

    try:
        env = distributed.read_env()
    except distributed.LaunchError as e:
        _fail(str(e), EXIT_BAD_INPUT)
    _setup_logging(env.rank)
    cfg = _train_config(args, env.rank, args.nproc_per_node or env.world_size)
    try:
        validate()
    except ConfigError as e:
        _fail(str(e), EXIT_BAD_INPUT, env.rank)
    if args.nproc_per_node and env.launcher == "single":
        _exec_torchrun(args, command)
    return env, cfg


def _join(env: DistEnv, cfg: Config) -> torch.device:
    """Join the process group (the device this rank uses), or one line naming the endpoint."""
    from dtrain import distributed

    try:
        return distributed.init(env, cfg.train.collective_timeout_s)
    except Exception as e:  # rendezvous failures: name the endpoint, not a stack
        _fail(f"cannot join the process group at {env.master_addr}:{env.master_port} as rank {env.rank} "
              f"of {env.world_size}: {first_line(e)}", EXIT_FAILED, env.rank, every_rank=True)


def cmd_train(args: argparse.Namespace) -> None:
    env, cfg = _launch(args, ("train",))
    from dtrain import allocator, distributed, preemption
    from dtrain.trainer import Preempted, fit

    allocator.tune()
    # SIGTERM / SIGUSR1 (preemption, torchrun stopping its workers) end in a checkpoint at the
    # next step boundary inside the loop, and in an exception elsewhere, so `finally` blocks
    # still mark the MLflow run KILLED instead of leaving it RUNNING.
    preemption.install()
    device = _join(env, cfg)
    clean = False
    try:
        fit(cfg, env, device)
        clean = True
    except Preempted as p:  # every rank agreed to stop after the same step and has checkpointed
        clean = True
        sys.exit(128 + p.signum)  # non-zero: the job is not done, so Kubernetes / SLURM run it again
    except BaseException as e:
        preemption.hold()  # torchrun's SIGTERM, sent once another rank has exited, must not cut this short
        # No barrier after an error: the other ranks may be inside a collective this rank will
        # never join. Exiting closes this rank's connections, which ends theirs promptly.
        line, code = _explain(e, cfg, env.rank)
        if line is None:
            raise  # a bug: let @record carry the traceback to torchrun's summary
        _report(line, code, env.rank)
    finally:
        distributed.shutdown(clean)


def _explain(e: BaseException, cfg: Config, rank: int) -> tuple[str | None, int]:
    """An exception of `fit` as (the one line to show, exit code); (None, 1) for a bug."""
    from dtrain import distributed
    from dtrain.checkpoint import CheckpointError, CheckpointWriteError
    from dtrain.trainer import TrainingError

    if isinstance(e, (ConfigError, CheckpointError)):
        return str(e), EXIT_BAD_INPUT
    if isinstance(e, (TrainingError, CheckpointWriteError)):
        return str(e), EXIT_FAILED
    if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or a stop signal before or after the loop
        signum = getattr(e, "signum", None)
        return ("interrupted", 130) if signum is None else (f"stopped by signal {signum}", 128 + signum)
    if isinstance(e, SystemExit):
        return None, int(e.code or 0)
    if distributed.is_timeout(e):
        stuck = distributed.stuck_ranks()
        who = (f"rank(s) {', '.join(map(str, stuck))} never joined it (hung or dead)" if stuck
               else "the rank that stalled could not be determined")
        return f"a collective waited longer than train.collective_timeout_s={cfg.train.collective_timeout_s:g}s: " \
               f"{who}", EXIT_FAILED
    if distributed.is_peer_gone(e):
        return "", EXIT_FAILED  # another rank failed first and said why (or died: torchrun names it)
    if isinstance(e, OSError):  # an unreadable file, a full disk: the path and the cause
        return f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", EXIT_FAILED
    return None, EXIT_FAILED


def _report(line: str, code: int, rank: int) -> NoReturn:
    """Print this rank's error unless rank 0 reports the same one (deterministic errors hit
    every rank alike: one line, not one per rank), then exit with `code`."""
    from dtrain import distributed

    if line and distributed.first_to_report(line):
        prefix = "dtrain: error: " if rank == 0 else f"dtrain[rank {rank}]: error: "
        print(prefix + line, file=sys.stderr, flush=True)
    sys.exit(code)


def cmd_check(args: argparse.Namespace) -> None:
    """`dtrain check`: the sanity checks of `dtrain.check`, on this process or under torchrun."""
    from dtrain import check, distributed

    env, cfg = _launch(args, ("check", f"--only={args.only}"), lambda: check.select(args.only))
    device = _join(env, cfg)
    code, clean = EXIT_FAILED, False
    try:
        code, clean = check.run(cfg, device, args.only), True
    except BaseException as e:
        line, code = _explain(e, cfg, env.rank)
        if line is None:
            raise
        _report(line, code, env.rank)
    finally:
        distributed.shutdown(clean)
    sys.exit(code)


MAXIMIZED = ("accuracy", "precision", "recall", "coverage", "density")


def cmd_search(args: argparse.Namespace) -> None:
    """`dtrain search`: an Optuna study over the recipe (see `dtrain.search`)."""
    import signal

    from dtrain import search
    from dtrain.tasks import load_config

    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        _fail(str(e), EXIT_BAD_INPUT)
    metric = args.metric or ("eval/accuracy" if cfg.task == "cnn" else "eval/loss")
    direction: Literal["maximize", "minimize"] = args.direction or (
        "maximize" if metric.removeprefix("eval/") in MAXIMIZED else "minimize")
    a = search.SearchArgs(args.recipe, args.overrides, Path(args.space), args.trials, metric, direction,
                          args.sampler, args.pruner, args.storage or search.default_storage(cfg),
                          args.study or f"{cfg.recipe}-search", Path(args.output or f"runs/{cfg.recipe}-search"),
                          args.nproc_per_node, args.max_failures, args.stop_grace)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signum)

    signal.signal(signal.SIGTERM, stop)  # the running trial is stopped with the search
    try:
        summary = search.search(a)
    except ConfigError as e:
        _fail(str(e), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        _fail("search stopped; `dtrain search` with the same --study and --storage continues it", 130)
    except search.TooManyFailures as e:
        _fail(str(e), 1)
    except search.TrialRefused as e:
        _fail(str(e), EXIT_BAD_INPUT)
    best = summary["best"]
    print(f"search: {len(summary['trials'])} trials in study {a.study!r}; "
          + (f"best {a.metric} {best['value']:.4g} (trial {best['number']}): {a.output / 'best.yaml'}" if best
             else "no trial completed"))


def cmd_compare(args: argparse.Namespace) -> None:
    from dtrain import compare, tracking

    if not args.experiment and not args.runs:
        _fail("compare: give --experiment NAME or --runs ID [ID ...]", EXIT_BAD_INPUT)
    try:
        report = compare.compare(tracking.resolve_uri(args.uri), args.experiment, args.runs or [], args.metric,
                                 Path(args.output), args.tolerance, args.target)
    except compare.CompareError as e:
        _fail(str(e), EXIT_BAD_INPUT)
    print(report["table"])
    print("\n".join(compare.verdict_lines(report["verdict"])))
    print(f"wrote {Path(args.output) / 'comparison.png'} and comparison.json"
          + (f"; MLflow comparison run {report['comparison_run_id']}" if report.get("comparison_run_id") else ""))
    if args.fail_on_gap and not report["verdict"]["ok"]:
        sys.exit(EXIT_FAILED)


def cmd_sweep(args: argparse.Namespace) -> None:
    """Train the recipe at each world size via torchrun into one experiment, then compare."""
    import json
    import subprocess

    from dtrain import data, tracking
    from dtrain.compare import sweep_overrides
    from dtrain.tasks import load_config

    try:
        sizes = [int(x) for x in args.world_sizes.split(",") if x.strip()]
        assert sizes and all(n > 0 for n in sizes)
    except (ValueError, AssertionError):
        _fail(f"--world-sizes={args.world_sizes!r}: expected positive integers like 1,2,4", EXIT_BAD_INPUT)
    try:
        cfg = load_config(args.recipe, args.overrides)
        data.plan_batches(cfg, min(sizes))
        extra = {n: sweep_overrides(cfg, n, min(sizes), args.keep) for n in sizes}
        for n in sizes:
            data.plan_batches(load_config(args.recipe, [*args.overrides, *extra[n]]), n)
    except ConfigError as e:
        _fail(str(e), EXIT_BAD_INPUT)
    base = Path(cfg.output_dir)
    run_ids = []
    for n in sizes:
        out = base / f"ws{n}"
        cmd = torchrun_cmd(n, args.recipe, [*args.overrides, *extra[n], f"output_dir={out}",
                                            f"tracking.run_name={cfg.recipe}-{n}x"])
        print(f"sweep: {n} rank(s) -> {out}", flush=True)
        if subprocess.run(cmd, env=torchrun_env()).returncode != 0:  # nosec B603 # dtrain's own argv, no shell
            _fail(f"sweep: the {n}-rank run failed (see above)", EXIT_FAILED)
        run_ids.append(json.loads((out / "summary.json").read_text()).get("run_id"))
    if not all(run_ids):
        _fail("sweep: tracking was off, nothing to compare (tracking.enabled=true)", EXIT_BAD_INPUT)
    args.experiment, args.runs, args.uri = cfg.tracking.experiment, run_ids, tracking.resolve_uri(cfg.tracking.uri)
    args.output = args.output or str(base / "comparison")
    cmd_compare(args)


def cmd_sample(args: argparse.Namespace) -> None:
    """Print what a trained run generates (a task with `generate_text`: the character LM)."""
    from dtrain.tasks import get_task, load_config

    out = Path(args.run)
    try:
        cfg = load_config(out / "config.yaml", beside=args.trust)
        task = get_task(cfg.task)(cfg)
        generate = getattr(task, "generate_text", None)
        if generate is None:
            raise ConfigError("run", str(out), f"is a {cfg.task} run; sample needs a task that generates text "
                                               "(transformer)")
        text = generate(out, args.prompt, args.tokens, args.temperature, args.top_k, args.seed)
    except ConfigError as e:
        _fail(str(e), EXIT_BAD_INPUT)
    print(text)


def cmd_keys(args: argparse.Namespace) -> None:
    """Every key of the recipe's task: the value this recipe (and overrides) gives it, its
    type, its default and what it does."""
    from dtrain import keys
    from dtrain.tasks import load_config

    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        _fail(str(e), EXIT_BAD_INPUT)
    print(keys.render(keys.keys(cfg), changed_only=args.changed))


def cmd_average(args: argparse.Namespace) -> None:
    """Average checkpoints of one run into a plain model.pt, BatchNorm statistics refreshed."""
    from dtrain.average import average
    from dtrain.checkpoint import CheckpointError

    folders = [Path(c) for c in args.checkpoints]
    try:
        cfg, metrics = average(folders, Path(args.output), args.bn_batches, args.trust)
    except (ConfigError, CheckpointError) as e:
        _fail(str(e), EXIT_BAD_INPUT)
    print(f"average: {len(folders)} checkpoint(s) of {cfg.output_dir} -> {args.output}"
          + (" | eval " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()) if metrics else ""))


def cmd_prepare_text(args: argparse.Namespace) -> None:
    """Encode text files into a token folder for `data.tokens` (streamed: any size)."""
    from dtrain import tokens

    try:
        meta = tokens.prepare(args.inputs, Path(args.output), args.val_fraction, args.max_chars,
                              show_progress=sys.stderr.isatty())
    except ConfigError as e:
        _fail(str(e), EXIT_BAD_INPUT)
    except OSError as e:  # an unwritable folder, a full disk: the temporary files are already removed
        _fail(f"prepare-text: {e.filename or args.output}: {e.strerror or e}", EXIT_FAILED)
    print(f"prepare-text: {len(meta['sources'])} file(s), {meta['train_tokens']:,} train + {meta['val_tokens']:,} val "
          f"tokens ({meta['dtype']}, {len(meta['vocab'])} symbols) -> {args.output}; train with data.tokens={args.output}")


def torchrun_cmd(nproc: int, recipe: str, overrides: list[str], max_restarts: int = 0,
                 command: Sequence[str] = ("train",)) -> list[str]:
    """`dtrain train` (or another `command`) on `nproc` ranks of this machine under torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "dtrain", *command, recipe, *overrides]


def torchrun_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (this environment) for a torchrun agent, with restarts made safe (the agent's
    own store, lent to the workers by default, keeps a dead attempt's keys: pytorch#135712)
    and SIGUSR1, SLURM's preemption notice, forwarded to the workers like SIGTERM."""
    return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", **(os.environ if base is None else base)}


def _exec_torchrun(args: argparse.Namespace, command: Sequence[str] = ("train",)) -> None:
    """`dtrain train --nproc-per-node N`: the recipe was validated above, in one process, so
    bad input never reaches torchrun (whose agent would add its own failure report)."""
    sys.stdout.flush()
    cmd = torchrun_cmd(args.nproc_per_node, args.recipe, args.overrides, command=command)
    os.execve(sys.executable, cmd, torchrun_env())  # nosec B606 # this interpreter running torchrun, no shell


def _recipe_command(sub: Any, name: str, func: Any, help: str, nproc_help: str) -> argparse.ArgumentParser:
    """A subcommand that takes a recipe and overrides, and can start itself under torchrun."""
    t: argparse.ArgumentParser = sub.add_parser(name, help=help)
    t.add_argument("recipe", help="YAML recipe, e.g. recipes/cnn_digits.yaml")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optim.lr=0.05")
    t.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=0, metavar="N", help=nproc_help)
    # The deepspeed launcher may also put --local_rank after the subcommand; the rank comes from the env.
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    t.set_defaults(func=func)
    return t


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtrain", description=dtrain.__doc__)
    p.add_argument("--version", action="version", version=f"dtrain {dtrain.__version__}")
    # The deepspeed launcher puts --local_rank=N before the subcommand (`-m dtrain --local_rank=0 train`).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    _recipe_command(sub, "train", cmd_train, "train a recipe (1 process, or under torchrun / deepspeed / "
                    "accelerate / srun)", "validate, then run N ranks on this machine via torchrun --standalone")
    k = _recipe_command(sub, "check", cmd_check, "sanity checks before a long run: init loss, overfit a batch, "
                        "batch independence, gradcheck, LR range, data, distributed (exit 1 on a FAIL)",
                        "run on N ranks of this machine via torchrun (the distributed check needs 2 or more)")
    k.add_argument("--only", default="", help="comma-separated check names (default: all)")

    q = _recipe_command(sub, "search", cmd_search, "hyperparameter search with Optuna: trials are dtrain runs, "
                        "MLflow child runs of one parent", "run each trial on N ranks via torchrun")
    q.add_argument("--space", required=True, help="YAML: recipe key -> {type: float|int|categorical, ...}")
    q.add_argument("--trials", type=int, default=10, help="finished (complete or pruned) trials the study needs")
    q.add_argument("--max-failures", type=int, default=3, help="failed trials after which this worker stops, "
                   "exit 1 (default 3; failed trials never count toward --trials)")
    q.add_argument("--stop-grace", type=float, default=60.0, help="seconds a stopped search gives its running "
                   "trial to checkpoint (SIGTERM) before killing it (default 60)")
    q.add_argument("--metric", default="", help="eval metric to optimise (default: eval/accuracy for cnn, "
                   "else eval/loss)")
    q.add_argument("--direction", choices=["maximize", "minimize"], default=None)
    q.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe")
    q.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median")
    q.add_argument("--storage", default="", help="Optuna storage URL (default: optuna.db beside the MLflow "
                   "store; postgresql+psycopg://... for several machines)")
    q.add_argument("--study", default="", help="study name (default RECIPE-search); the same name continues it")
    q.add_argument("--output", default="", help="folder for trials, search.json, best.yaml, plots")

    def compare_options(c: argparse.ArgumentParser) -> None:
        c.add_argument("--metric", default="eval/accuracy", help="eval metric to compare (default eval/accuracy)")
        c.add_argument("--tolerance", type=float, default=0.01,
                       help="how much worse than the baseline a final metric may be (default 0.01 = 1 point)")
        c.add_argument("--target", type=float, default=None,
                       help="metric value for 'time to target' (default: baseline final minus the tolerance)")
        c.add_argument("--fail-on-gap", action="store_true", help="exit 1 when a run is outside the tolerance")

    c = sub.add_parser("compare", help="single- vs multi-GPU convergence, read back from MLflow")
    c.add_argument("--experiment", help="MLflow experiment whose runs to compare")
    c.add_argument("--runs", nargs="+", help="compare exactly these run ids")
    c.add_argument("--uri", default="", help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    c.add_argument("--output", required=True, help="folder for comparison.png and comparison.json")
    compare_options(c)
    c.set_defaults(func=cmd_compare)

    w = sub.add_parser("sweep-world-sizes", help="train a recipe at several world sizes via torchrun, then compare")
    w.add_argument("recipe")
    w.add_argument("overrides", nargs="*")
    w.add_argument("--world-sizes", default="1,2", help="comma-separated rank counts (default 1,2)")
    w.add_argument("--keep", choices=["global", "per-rank"], default="global",
                   help="keep the recipe's global batch (strong scaling, default) or its per-rank batch at the "
                        "smallest world size (weak scaling: the global batch and the LR grow with the ranks)")
    w.add_argument("--output", default="", help="comparison folder (default OUTPUT_DIR/comparison)")
    compare_options(w)
    w.set_defaults(func=cmd_sweep)

    k = sub.add_parser("keys", help="every key of a recipe's task: value, type, default, what it does")
    k.add_argument("recipe")
    k.add_argument("overrides", nargs="*")
    k.add_argument("--changed", action="store_true", help="only the keys the recipe sets to a non-default value")
    k.set_defaults(func=cmd_keys)

    a = sub.add_parser("average", help="average checkpoints of one run into a plain model.pt")
    a.add_argument("checkpoints", nargs="+", help="step_* checkpoint folders of one run")
    a.add_argument("--output", required=True, help="the averaged state_dict: a .safetensors file, or a model.pt")
    a.add_argument("--bn-batches", type=int, default=100,
                   help="training batches to recompute BatchNorm statistics on (0: keep the averaged ones)")
    a.add_argument("--trust", action="store_true", help="the run folder is yours: import a task module found in "
                   "it, and read DeepSpeed checkpoints (which unpickle)")
    a.set_defaults(func=cmd_average)

    t = sub.add_parser("prepare-text", help="encode text files into train.bin / val.bin for data.tokens")
    t.add_argument("inputs", nargs="+", help="text files or folders (their text files, in sorted order)")
    t.add_argument("--output", required=True, help="the token folder (train.bin, val.bin, meta.json)")
    t.add_argument("--val-fraction", type=float, default=0.1, help="the last part of the text held out")
    t.add_argument("--max-chars", type=int, default=0, help="stop after this many characters (0: all)")
    t.set_defaults(func=cmd_prepare_text)

    s = sub.add_parser("sample", help="generate text from a trained transformer run")
    s.add_argument("run", help="the run's output_dir (holds config.yaml, model.pt, vocab.json)")
    s.add_argument("--prompt", default="def ", help="text to continue")
    s.add_argument("--tokens", type=int, default=300, help="characters to generate")
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--trust", action="store_true", help="the run folder is yours: import a task module found in it")
    s.set_defaults(func=cmd_sample)
    return p


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`train r.yaml --nproc-per-node 2 optim.lr=0.1`).
    unknown = [x for x in extra if "=" not in x or x.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    # @record writes an unexpected exception of this rank to torchrun's error file, so the
    # agent's failure summary shows the failing rank's traceback rather than "exitcode 1".
    record(args.func)(args)
