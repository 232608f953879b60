"""The bodies of the commands that run in one process: each turns the parsed arguments into a
call of the module that does the work, and prints what it returns. Errors are raised
(`dtrain.errors.Failure`); `dtrain.cli.main` shows them in one line."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Literal

from dtrain import tracking
from dtrain.tracking import compare
from dtrain.config import keys
from dtrain.studies import search
from dtrain.studies import sweep
from dtrain.data import tokens
from dtrain.postrun.average import average
from dtrain.errors import ConfigError
from dtrain.errors import Failure, WorkFailed
from dtrain.tasks import get_task
from dtrain.train.config import load_config

MAXIMIZED = ("accuracy", "precision", "recall", "coverage", "density")
"""Metrics a named `--metric` maximises when `--direction` is not given."""


def search_command(args: argparse.Namespace) -> None:
    """`dtrain search`: an Optuna study over the recipe (see `dtrain.studies.search`)."""
    cfg = load_config(args.recipe, args.overrides)
    for flag, least in (("prune_startup", 0), ("prune_warmup", 0), ("max_failures", 1)):
        if getattr(args, flag) < least:
            raise ConfigError(f"--{flag.replace('_', '-')}", getattr(args, flag), f"must be >= {least}")
    headline, higher = get_task(cfg.task)(cfg).headline_metric()
    metric = args.metric or f"eval/{headline}"
    named = metric.removeprefix("eval/")
    maximize = higher if named == headline else named in MAXIMIZED
    direction: Literal["maximize", "minimize"] = args.direction or ("maximize" if maximize else "minimize")
    a = search.SearchArgs(args.recipe, args.overrides, Path(args.space), args.trials, metric, direction,
                          args.sampler, args.pruner, args.storage or search.default_storage(cfg),
                          args.study or f"{cfg.recipe}-search", Path(args.output or f"runs/{cfg.recipe}-search"),
                          args.nproc_per_node, args.max_failures, args.prune_startup, args.prune_warmup,
                          args.stop_grace)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signum)

    signal.signal(signal.SIGTERM, stop)  # the running trial is stopped with the search
    try:
        summary = search.search(a)
    except KeyboardInterrupt:
        raise Failure("search stopped; `dtrain search` with the same --study and --storage continues it", 130) from None
    best = summary["best"]
    print(f"search: {len(summary['trials'])} trials in study {a.study!r}; "
          + (f"best {a.metric} {best['value']:.4g} (trial {best['number']}): {a.output / 'best.yaml'}" if best
             else "no trial completed"))


def compare_command(args: argparse.Namespace) -> None:
    if not args.experiment and not args.runs:
        raise Failure("compare: give --experiment NAME or --runs ID [ID ...]")
    report = compare.compare(tracking.resolve_uri(args.uri), args.experiment, args.runs or [], args.metric,
                             Path(args.output), args.tolerance, args.target)
    print(report["table"])
    print("\n".join(compare.verdict_lines(report["verdict"])))
    print(f"wrote {Path(args.output) / 'comparison.png'} and comparison.json"
          + (f"; MLflow comparison run {report['comparison_run_id']}" if report.get("comparison_run_id") else ""))
    if args.fail_on_gap and not report["verdict"]["ok"]:
        sys.exit(1)


def sweep_command(args: argparse.Namespace) -> None:
    """Train the recipe at each world size via torchrun into one experiment, then compare."""
    cfg, run_ids = sweep.sweep(args.recipe, args.overrides, sweep.parse_sizes(args.world_sizes), args.keep)
    args.experiment, args.runs, args.uri = cfg.tracking.experiment, run_ids, tracking.resolve_uri(cfg.tracking.uri)
    args.output = args.output or str(Path(cfg.output_dir) / "comparison")
    compare_command(args)


def sample_command(args: argparse.Namespace) -> None:
    """Print what a trained run generates (a task with `generate_text`: the character LM)."""
    out = Path(args.run)
    cfg = load_config(out / "config.yaml", beside=args.trust)
    task = get_task(cfg.task)(cfg)
    generate = getattr(task, "generate_text", None)  # optional: only a task that generates text has it
    if generate is None:
        raise ConfigError("run", str(out), f"is a {cfg.task} run; sample needs a task that generates text (transformer)")
    print(generate(out, args.prompt, args.tokens, args.temperature, args.top_k, args.seed))


def predict_command(args: argparse.Namespace) -> None:
    """Predictions of a finished run for a .npy of inputs (see `dtrain.postrun.predict`)."""
    from dtrain.postrun.predict import predict_file

    if args.batch_size < 1:
        raise ConfigError("--batch-size", args.batch_size, "must be >= 1")
    print(predict_file(args.run, Path(args.inputs), Path(args.output), args.batch_size, args.trust))


def keys_command(args: argparse.Namespace) -> None:
    """Every key of the recipe's task: the value this recipe (and overrides) gives it, its
    type, its default and what it does."""
    print(keys.render(keys.keys(load_config(args.recipe, args.overrides)), changed_only=args.changed))


def average_command(args: argparse.Namespace) -> None:
    """Average checkpoints of one run into a plain model.pt, BatchNorm statistics refreshed."""
    folders = [Path(c) for c in args.checkpoints]
    cfg, metrics = average(folders, Path(args.output), args.bn_batches, args.trust)
    print(f"average: {len(folders)} checkpoint(s) of {cfg.output_dir} -> {args.output}"
          + (" | eval " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()) if metrics else ""))


def _floats(key: str, text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(key, text, "must be comma-separated numbers") from None


def soup_command(args: argparse.Namespace) -> None:
    """Combine runs by their weights (uniform, greedy or weighted soup) into a run folder."""
    from dtrain.postrun import soup

    out = soup.soup(args.runs, args.method, Path(args.output), args.bn_batches, _floats("--weights", args.weights),
                    args.trust)
    m = out["metric"]
    parts = ", ".join(f"{Path(i['run']).name} {i[m]:.4g} (x{i['weight']:.2f})" for i in out["ingredients"])
    print(f"soup ({args.method}): {m} {out['soup'][m]:.4g} from {parts} -> {args.output}")


def interpolate_command(args: argparse.Namespace) -> None:
    """The held-out metric along the line between two runs' weights."""
    from dtrain.postrun import soup

    alphas = _floats("--alphas", args.alphas)
    if len(alphas) < 2 or alphas != sorted(alphas):
        raise ConfigError("--alphas", args.alphas, "two or more increasing values (0: A, 1: B)")
    out = soup.interpolate(args.a, args.b, alphas, Path(args.output), args.bn_batches, args.trust)
    m = out["metric"]
    curve = " ".join(f"{p['alpha']:g}:{p[m]:.4g}" for p in out["points"])
    print(f"interpolate {m}: {curve} | barrier {out['barrier']:.4g} -> {args.output}/interpolation.png")


def evaluate_command(args: argparse.Namespace) -> None:
    """A run's held-out metrics, the recipe changed by overrides."""
    from dtrain.postrun import soup

    metrics = soup.evaluate(args.run, args.overrides, args.trust)
    print(f"evaluate {args.run}" + "".join(f" {k}={v:.6g}" for k, v in metrics.items()))


def prepare_text_command(args: argparse.Namespace) -> None:
    """Encode text files into a token folder for `data.tokens` (streamed: any size)."""
    try:
        meta = tokens.prepare(args.inputs, Path(args.output), args.val_fraction, args.max_chars,
                              show_progress=sys.stderr.isatty(), tokenizer=args.tokenizer)
    except OSError as e:  # an unwritable folder, a full disk: the temporary files are already removed
        raise WorkFailed(f"prepare-text: {e.filename or args.output}: {e.strerror or e}") from None
    print(f"prepare-text: {len(meta['sources'])} file(s), {meta['train_tokens']:,} train + {meta['val_tokens']:,} val "
          f"tokens ({meta['dtype']}, {meta.get('vocab_size') or len(meta['vocab'])} symbols) -> {args.output}; "
          f"train with data.tokens={args.output}")
