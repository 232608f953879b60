"""`dtrain search RECIPE --space SPACE.yaml --trials N`: hyperparameter search with Optuna.

Every trial is an ordinary `dtrain train` of the recipe with the trial's values as overrides
(one process, or `--nproc-per-node N` ranks under torchrun; any engine), tracked as an MLflow
child run under one parent run per study. The trial reports its eval metric after each
evaluation and stops when the study's pruner says so (`dtrain.features.trial`). The study lives in an
Optuna RDB storage (`--storage`: SQLite beside the MLflow store by default, PostgreSQL for
several machines): workers started on the same study share its trials, and a search started
again continues it. The output folder gets `search.json` (every trial), `best.yaml` (the
recipe with the best values) and Optuna's plots, which the parent run also holds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dtrain import tracking
from dtrain.config import Config, recipe, redact
from dtrain.errors import ConfigError
from dtrain.errors import TooManyFailures as TooManyFailures
from dtrain.errors import TrialRefused as TrialRefused
from dtrain.features.trial import STORAGE_ENV
from dtrain.runtime.files import atomic_write, first_line
from dtrain.runtime.launch import torchrun_cmd, torchrun_env
from dtrain.studies.search.space import Param, load_space, overrides, suggest
from dtrain.train.config import load_config

log = logging.getLogger("dtrain")
FINISHED = ("COMPLETE", "PRUNED")


@dataclass
class SearchArgs:
    recipe: str
    overrides: list[str]
    space: Path
    trials: int
    metric: str
    """An eval metric, with or without `eval/`."""
    direction: Literal["minimize", "maximize"]
    sampler: str
    pruner: str
    storage: str
    study: str
    output: Path
    nproc_per_node: int
    max_failures: int = 3
    """Failed trials after which this worker stops (they never count toward `trials`)."""
    prune_startup: int = 3
    """Completed trials before the median pruner prunes any."""
    prune_warmup: int = 1
    """A trial's first evaluations that never prune it."""
    stop_grace_s: float = 60.0
    """A stopped search gives its running trial this long to checkpoint and exit (SIGTERM),
    then kills what is left of it (SIGKILL to its process group)."""


class TrialFailed(RuntimeError):
    pass


def default_storage(cfg: Config) -> str:
    """A SQLite file beside the MLflow store when that is SQLite, else in the launch directory."""
    uri = tracking.resolve_uri(cfg.tracking.uri)
    folder = Path(uri[len("sqlite:///") :]).resolve().parent if uri.startswith("sqlite:///") else Path.cwd()
    return f"sqlite:///{folder / 'optuna.db'}"


def make_sampler(name: str, params: list[Param], seed: int) -> Any:
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler({p.key: p.grid() for p in params}, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=3)


def open_study(a: SearchArgs, cfg: Config, params: list[Param]) -> tuple[Any, bool]:
    """(study, created here): create it, or load it when another worker (or an earlier run of
    this search) did."""
    import optuna

    from dtrain.features.trial import make_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = rdb_storage(a.storage)
    sampler, pruner = make_sampler(a.sampler, params, cfg.seed), make_pruner(a.pruner, a.prune_startup)
    try:
        return optuna.create_study(
            storage=storage, study_name=a.study, direction=a.direction, sampler=sampler, pruner=pruner
        ), True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=a.study, storage=storage, sampler=sampler, pruner=pruner)
        if study.direction.name.lower() != a.direction:
            raise ConfigError(
                "--direction",
                a.direction,
                f"study {a.study!r} in {a.storage} is to {study.direction.name.lower()}; use that, or another --study",
            ) from None
        return study, False


def rdb_storage(url: str) -> Any:
    """Optuna's RDB storage with heartbeats: a trial whose worker was killed is failed after the
    grace period and run again. Workers creating a new database's tables at once: one wins, the
    others retry."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 5
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url,
                    heartbeat_interval=10,
                    grace_period=60,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                )
        except Exception as e:
            if attempt == 4:
                raise ConfigError("--storage", url, f"cannot open it: {first_line(e)}") from None
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def parent_run(a: SearchArgs, cfg: Config, study: Any, created: bool) -> str:
    """The study's MLflow parent run: created by the worker that created the study, its id
    kept in the study for the others (and for a search started again)."""
    if not cfg.tracking.enabled:
        return ""
    if not created:
        wait_for_parent(study)
        return str(study.user_attrs.get("mlflow_parent_run", ""))
    uri = tracking.resolve_uri(cfg.tracking.uri)
    try:
        return _create_parent(a, cfg, study, uri)
    except Exception as e:  # the search runs without a parent run, as training runs without tracking
        log.warning("search: MLflow at %s unavailable, no parent run: %s", uri, first_line(e))
        return ""


def _create_parent(a: SearchArgs, cfg: Config, study: Any, uri: str) -> str:
    import mlflow

    down = tracking.probe(uri)
    if down:
        raise ConnectionError(down)
    client = tracking.open_client(uri)
    exp_id = tracking.experiment_id(client, uri, cfg.tracking.experiment)
    run = client.create_run(
        exp_id,
        run_name=f"{a.study}",
        tags={"dtrain.kind": "search", "dtrain.study": a.study, "dtrain.config.recipe": cfg.recipe},
    )
    client.log_batch(
        run.info.run_id,
        params=[
            mlflow.entities.Param(k, str(v))
            for k, v in {
                "metric": a.metric,
                "direction": a.direction,
                "sampler": a.sampler,
                "pruner": a.pruner,
                "trials": a.trials,
            }.items()
        ],
    )
    study.set_user_attr("mlflow_parent_run", run.info.run_id)
    return str(study.user_attrs["mlflow_parent_run"])


def run_trial(a: SearchArgs, cfg: Config, trial: Any, values: dict[str, Any], parent: str) -> float:
    """One `dtrain train` of the recipe with `values`; its final eval metric. Raises
    optuna.TrialPruned when the study stopped it, TrialFailed when it failed."""
    import optuna

    out = a.output / f"trial_{trial.number:03d}"
    if out.exists():  # an earlier study's trial of that number: its pruned.json / summary.json would be read
        aside = out.with_name(f"{out.name}.earlier-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        log.warning("search: %s held an earlier trial's output; moved to %s", out, aside.name)
    extra = [*overrides(values), *trial_keys(a, trial, out, parent)]
    args, private = redact.portable([*a.overrides, *extra])  # a password never on a trial's command line
    cmd = (
        torchrun_cmd(a.nproc_per_node, a.recipe, args)
        if a.nproc_per_node
        else [sys.executable, "-m", "dtrain", "train", a.recipe, *args]
    )
    proc = subprocess.Popen(
        cmd,
        env=torchrun_env({**os.environ, STORAGE_ENV: a.storage, **private}, nproc=a.nproc_per_node),  # nosec B603 # dtrain's argv
        start_new_session=True,
    )
    try:
        code = proc.wait()
    except BaseException:  # the search is stopped: so is its trial (and every process it started)
        stop_process_group(proc, a.stop_grace_s)
        raise
    if (out / "pruned.json").exists():
        raise optuna.TrialPruned(json.loads((out / "pruned.json").read_text())["pruned_at_step"])
    if code == 2:  # the CLI's exit code for bad input, said in the trial's own line above
        raise TrialRefused(
            f"search: trial {trial.number} refused the recipe (its error line is above); "
            "no trial would run: fix the recipe, the space or --metric"
        )
    if code != 0:
        raise TrialFailed(f"trial {trial.number} exited with {code} (see its output above)")
    summary = json.loads((out / "summary.json").read_text())
    return float(summary["eval"][metric_name(a.metric)])


def trial_keys(a: SearchArgs, trial: Any, out: Path, parent: str) -> list[str]:
    """The overrides that make a run a trial of the study (the storage's password masked: the
    trial reads the real URL from its environment)."""
    return [f"output_dir={out}", "checkpoint.overwrite=true", f"tracking.run_name={a.study}-trial-{trial.number}",
            f"tracking.parent_run_id={parent}", f"trial.storage={redact.url(a.storage)}", f"trial.study={a.study}",
            f"trial.trial_id={trial._trial_id}", f"trial.metric={metric_name(a.metric)}", f"trial.pruner={a.pruner}",
            f"trial.prune_startup={a.prune_startup}", f"trial.prune_warmup={a.prune_warmup}"]  # fmt: skip


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float = 60.0) -> None:
    """SIGTERM to the trial's process group (torchrun and its ranks, which checkpoint), then
    SIGKILL to whatever is still there after `grace_s`: no trial is left running orphaned."""
    import signal

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def metric_name(metric: str) -> str:
    return metric.removeprefix("eval/")


def search(a: SearchArgs) -> dict[str, Any]:
    """Run trials until the study has `a.trials` finished (complete or pruned) ones."""
    import optuna

    cfg = load_config(a.recipe, a.overrides)
    params = load_space(a.space, cfg)
    fixed = recipe.flatten(recipe.to_dict(cfg))
    study, created = open_study(a, cfg, params)
    parent = parent_run(a, cfg, study, created)
    a.output.mkdir(parents=True, exist_ok=True)

    def objective(trial: optuna.Trial) -> float:
        values = suggest(params, trial, fixed)
        try:
            return run_trial(a, cfg, trial, values, parent)
        except KeyboardInterrupt:  # stopped: the trial ends FAILED, and its values run first next time
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            raise
        except TrialFailed as e:
            trial.set_user_attr("failure", str(e))
            raise

    failures: list[str] = []

    def on_done(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        print(progress_line(study, trial), flush=True)
        if trial.state.name == "FAIL":
            failures.append(str(trial.user_attrs.get("failure", f"trial {trial.number} failed")))
        if sum(t.state.name in FINISHED for t in study.trials) >= a.trials or len(failures) >= a.max_failures:
            study.stop()

    if redact.has_password(a.storage):
        log.warning(
            "search: the --storage URL holds a password, which the process list shows; put it in "
            "PGPASSWORD or ~/.pgpass instead (psycopg reads both)"
        )
    if sum(t.state.name in FINISHED for t in study.trials) < a.trials:
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # its failed-trial warning carries a traceback;
        study.optimize(objective, callbacks=[on_done], catch=(TrialFailed,))  # progress_line says it in one line
    summary = write_outputs(a, cfg, study, parent)
    for line in edge_warnings(params, summary["best"]):
        print(line, flush=True)
    if len(failures) >= a.max_failures:
        raise TooManyFailures(
            f"search: {len(failures)} trials failed (--max-failures={a.max_failures}); the last: "
            f"{failures[-1]}; see {a.output} and the trials' output above"
        )
    return summary


def edge_warnings(params: list[Param], best: dict[str, Any] | None) -> list[str]:
    """A line for each numeric value of the best trial within 5% of its range's edge (on a log
    scale for log ranges): the optimum may lie outside what was searched."""
    out = []
    for p in params:
        value = (best or {}).get("params", {}).get(p.key)
        if p.type == "categorical" or not isinstance(value, (int, float)) or p.high <= p.low:
            continue
        scale = math.log if p.log and p.low > 0 else float
        where = (scale(value) - scale(p.low)) / (scale(p.high) - scale(p.low))
        if not 0.05 <= where <= 0.95:
            edge = "low" if where < 0.05 else "high"
            out.append(
                f"search: warning: the best {p.key}={value:.4g} lies at the {edge} edge of its range "
                f"[{p.low:g}, {p.high:g}]; the optimum may be beyond it: widen the range and search again"
            )
    return out


def progress_line(study: Any, trial: Any) -> str:
    """One line per finished trial: value (or pruned / failed), values, best so far."""
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    best = f"best {study.best_value:.4g} (trial {study.best_trial.number})" if done else "no complete trial yet"
    what = (
        f"{trial.value:.4g}"
        if trial.state.name == "COMPLETE"
        else trial.user_attrs.get("failure", "failed")
        if trial.state.name == "FAIL"
        else trial.state.name.lower()
    )
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    return f"search: trial {trial.number}: {what} | {shown} | {best}"


def write_outputs(a: SearchArgs, cfg: Config, study: Any, parent: str) -> dict[str, Any]:
    """search.json, best.yaml and the plots in the output folder; the same on the parent run."""
    trials = [
        {
            "number": t.number,
            "state": t.state.name,
            "params": t.params,
            "value": t.value,
            "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
        }
        for t in study.trials
    ]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    summary: dict[str, Any] = {
        "study": a.study,
        "storage": redact.url(a.storage),
        "metric": a.metric,
        "direction": a.direction,
        "trials": trials,
        "best": None,
    }
    files = [a.output / "search.json"]
    if complete:
        best = study.best_trial
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params}
        best_cfg = recipe.build(type(cfg), _with(recipe.to_dict(cfg), best.params))
        best_cfg.output_dir = ""
        recipe.dump_yaml(best_cfg, a.output / "best.yaml")
        files += [a.output / "best.yaml", *plots(study, a.output, a.metric)]
    text = json.dumps(summary, indent=2, default=str) + "\n"
    atomic_write(a.output / "search.json", lambda tmp: tmp.write_text(text))
    if parent:
        log_parent(cfg, parent, summary, files, finished=sum(t["state"] in FINISHED for t in trials) >= a.trials)
    return summary


def _with(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    for item in overrides(values):
        recipe.apply_override(raw, item)
    return raw


def plots(study: Any, out: Path, metric: str) -> list[Path]:
    """Optuna's plots with the metric's name on their axes: the optimisation history, each
    parameter's slice (value against the metric, per trial) and, with two or more parameters,
    their importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm

    made = []
    kinds: list[tuple[str, Any]] = [("history", ovm.plot_optimization_history), ("slice", ovm.plot_slice)]
    if len({k for t in study.trials for k in t.params}) > 1:  # one parameter's importance is 1: no plot
        kinds.append(("importances", ovm.plot_param_importances))
    for name, fn in kinds:
        try:
            with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fn(study, target_name=metric)
        except (ValueError, RuntimeError) as e:  # e.g. importances need 2+ complete trials
            log.info("search: no %s plot: %s", name, e)
            continue
        path, fig = out / f"{name}.png", plt.gcf()
        fig.savefig(path, dpi=100, bbox_inches="tight")  # (a slice plot's colour bar refuses tight_layout)
        plt.close(fig)
        made.append(path)
    return made


def log_parent(cfg: Config, run_id: str, summary: dict[str, Any], files: list[Path], finished: bool) -> None:
    client = tracking.open_client(tracking.resolve_uri(cfg.tracking.uri))
    if summary["best"]:
        client.log_metric(run_id, "best_value", summary["best"]["value"], step=len(summary["trials"]))
        client.set_tag(run_id, "dtrain.best_trial", summary["best"]["number"])
    for path in files:
        client.log_artifact(run_id, str(path))
    if finished:
        client.set_terminated(run_id, "FINISHED")


def wait_for_parent(study: Any, timeout_s: float = 60.0) -> None:
    """Workers started together: the others wait for the first one's parent run id."""
    deadline = time.monotonic() + timeout_s
    while "mlflow_parent_run" not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)
