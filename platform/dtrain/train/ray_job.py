"""`dtrain train RECIPE --ray-workers N`: the job as a Ray Train job (the `ray` extra; never
imported otherwise).

This process validates the recipe, joins a Ray cluster (`--ray-address`, e.g. `auto` inside
a KubeRay or Anyscale job; none: a local instance) and hands `ray.train.torch.TorchTrainer`
N workers. Ray starts them, sets up their process group (gloo on CPUs, NCCL on GPUs) and
exports RANK / WORLD_SIZE / LOCAL_RANK; each worker then runs dtrain's normal loop on that
group (`environments.RayTrain` reads the variables, `distributed.init` keeps Ray's group).

The run folder is Ray's storage: `storage_path` is output_dir's parent and the Ray run's name
is output_dir's own name, so dtrain's checkpoints are where Ray keeps the run, on storage
every node must reach (a shared file system) when the job spans machines.

Failures: `--ray-max-failures K` is Ray's `FailureConfig(max_failures=K)`. When a worker dies
Ray restarts the group. Ray tells an attempt nothing of earlier ones, so the first attempt
leaves a marker in output_dir (`.ray-<job id>`, removed when the job ends): an attempt that
finds it continues with `resume=auto` exactly from the newest checkpoint written since, in the
same MLflow run (the checkpoint carries its id), or, where the first attempt wrote none, starts
as the first did (the recipe's own `resume`). A fresh start is refused before Ray starts
anything when output_dir holds another run's checkpoints, as every dtrain start does.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import secrets
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Sequence

from dtrain import checkpoint, data, tracking
from dtrain.config import Config, redact
from dtrain.errors import ConfigError, WorkFailed, shown
from dtrain.runtime import distributed, files, optional
from dtrain.train import resume
from dtrain.train.config import load_config, validate

log = logging.getLogger("dtrain")


def launch(args: argparse.Namespace) -> None:
    """`dtrain train --ray-workers N`: validate, run, and say in one line why a job failed."""
    if args.nproc_per_node:
        raise ConfigError(
            "--nproc-per-node",
            args.nproc_per_node,
            "is torchrun's; with --ray-workers Ray starts the ranks: leave it out",
        )
    overrides = list(args.overrides)
    cfg = load_config(args.recipe, overrides)
    if resume.place(cfg, overrides):  # the recipe's folder holds an earlier run: the next free one
        overrides.append(f"output_dir={cfg.output_dir}")
    job = trainer(
        args.recipe,
        overrides,
        args.ray_workers,
        max_failures=args.ray_max_failures,
        use_gpu=args.ray_gpu,
        address=args.ray_address,
    )
    import ray

    try:
        job.fit()
    except Exception as e:  # Ray's TrainingFailedError and kin: the first worker's cause, one line
        ray.shutdown()  # before the line: Ray's log threads would otherwise print after it
        close_left_running(args.recipe, overrides)
        failures = getattr(e, "worker_failures", None) or {}
        # The worker that failed first, not the ones whose collectives broke because it went away.
        ranked = sorted(failures.items(), key=lambda kv: (distributed.is_peer_gone(kv[1]), kv[0]))
        rank, cause = ranked[0] if ranked else (None, e.__cause__ or e)
        who = f"worker {rank}: " if rank is not None else ""
        raise WorkFailed(
            f"ray: the job failed after {args.ray_max_failures} restart(s) allowed "
            f"(--ray-max-failures): {who}{_cause_line(cause)}"
        ) from None
    ray.shutdown()


def close_left_running(recipe: str, overrides: Sequence[str]) -> None:
    """After a job that failed for good: its MLflow run marked FAILED where still RUNNING. Ray
    stops the surviving workers of a broken group at once, so rank 0 may not have closed it;
    this process outlives them all. Found by its output_dir; never fatal."""
    cfg = load_config(recipe, overrides)
    if not cfg.tracking.enabled:
        return
    import mlflow

    out = str(Path(cfg.output_dir).resolve())
    try:
        client = mlflow.MlflowClient(_absolute(tracking.resolve_uri(cfg.tracking.uri)))
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None or "'" in out:
            return
        for run in client.search_runs(
            [experiment.experiment_id], f"params.output_dir = '{out}' and attributes.status = 'RUNNING'"
        ):
            client.set_terminated(run.info.run_id, "FAILED")
            log.info("ray: MLflow run %s marked FAILED (its workers were stopped before they could)", run.info.run_id)
    except Exception as e:  # a tracking outage must not hide the job's own error line
        log.warning("ray: could not close the MLflow run of %s: %s", out, str(e).splitlines()[0][:200])


def _absolute(uri: str) -> str:
    """A relative SQLite store (MLflow's default, ./mlflow.db) as an absolute one: the workers'
    working directory may not be this process's."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _continue_an_earlier_attempt(cfg: Any, marker: Path, rank: int) -> None:
    """Every rank looks for the first attempt's marker before rank 0 of the first attempt
    writes it (a barrier between), so all agree on whether this is a restart. A restart
    resumes from the newest checkpoint written since the marker; none: it starts as the first."""
    restart = marker.exists()
    distributed.barrier()
    if restart:
        since = marker.stat().st_mtime
        ours = [p for p in checkpoint.candidates(Path(cfg.output_dir) / "checkpoints") if p.stat().st_mtime >= since]
        if ours:
            cfg.resume = "auto"  # the newest checkpoint is this job's
            cfg.checkpoint.overwrite = False
            log.info("ray: a restarted attempt; continuing from %s", ours[0].name)
    elif rank == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


def _cause_line(e: BaseException) -> str:
    """The line that says why: dtrain's own line (an error's last line), or, for a worker whose
    process died (Ray's health check lost it, with nothing more to say), that it died."""
    if type(e).__name__ == "WorkerHealthCheckFailedError":
        return "its process died (killed, out of memory, or its node lost); Ray's logs name the cause"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(e).__name__


def trainer(
    recipe: str,
    overrides: Sequence[str],
    workers: int,
    *,
    max_failures: int = 0,
    use_gpu: bool = False,
    address: str = "",
) -> Any:
    """A `ray.train.torch.TorchTrainer` that runs the recipe on `workers` Ray workers, validated
    before Ray starts anything (a ConfigError otherwise); `.fit()` runs it. The Python API for a
    script of one's own (examples/ray), and what `dtrain train --ray-workers` runs."""
    cfg = _validated(recipe, overrides, workers, max_failures)
    out = Path(cfg.output_dir).resolve()
    job_id = uuid.uuid4().hex[:12]
    ray = optional.require("ray", "ray", "--ray-workers", workers)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    public = _workers_overrides(
        [*overrides, f"output_dir={out}", f"tracking.uri={_absolute(tracking.resolve_uri(cfg.tracking.uri))}"],
        remote=bool(address) or ray.is_initialized(),
    )
    if not ray.is_initialized():
        join(ray, address) if address else local_instance(ray)
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "recipe": str(Path(recipe).resolve()),
            "job_id": job_id,
            "cwd": os.getcwd(),
            "overrides": public,
        },  # fmt: skip
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(cfg.train.collective_timeout_s)),
        run_config=RunConfig(
            name=out.name, storage_path=str(out.parent), failure_config=FailureConfig(max_failures=max_failures)
        ),
    )


def _workers_overrides(overrides: list[str], remote: bool) -> list[str]:
    """The overrides that travel in the job's config (Ray keeps it, shows it): those holding a
    password go in this process's environment instead, which a local instance's workers start
    with; a cluster elsewhere gets none (one line: it needs MLflow's variables of its own)."""
    public, private = redact.portable(overrides)
    if private and remote:
        key, _, value = next(o for o in overrides if redact.has_password(o)).partition("=")
        raise ConfigError(key, redact.text(value), "holds a password, which would travel with the Ray job's config: "
                          "give the cluster MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead")  # fmt: skip
    os.environ.update(private)
    return public


def join(ray: Any, address: str) -> None:
    """Join the Ray cluster at `address`, or one line naming it (a bad address, nobody there:
    a 5 s probe first, as Ray itself waits minutes for a head that is not there)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            raise ConfigError("--ray-address", address, f"nothing answers there ({e.strerror or e}); give the "
                              "head's host:port (`ray start --head` prints it), or auto on a node of the "
                              "cluster") from None  # fmt: skip
    try:
        ray.init(address=address)
    except Exception as e:
        raise ConfigError("--ray-address", address, f"no Ray cluster joined there ({files.first_line(e)}); give "
                          "its head's host:port (`ray start --head` prints it), or auto on a node of the "
                          "cluster") from None  # fmt: skip


def local_instance(ray: Any) -> None:
    """A Ray instance of this job's own, which no one else joins: token authentication on (Ray's
    own, `RAY_AUTH_MODE=token`, with a fresh token in this process's environment, never in a
    file) and its session folder inside a folder private to the user (Ray makes its own 0777).
    A token the user set (`RAY_AUTH_TOKEN`, `RAY_AUTH_MODE`) is kept."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_urlsafe(32))
    redact.register(os.environ["RAY_AUTH_TOKEN"])
    # Ray read its config when imported: have it read the mode and token again, as its own
    # `ray.init()` does when it turns authentication on.
    raylet: Any = importlib.import_module("ray._raylet")  # compiled: no type stubs
    raylet.Config.initialize("")
    raylet.AuthenticationTokenLoader.instance().reset_cache()
    private = tempfile.mkdtemp(prefix="dtrain-ray-")  # 0700
    log.info("ray: a local instance of this job's own (token authentication, its files in %s)", private)
    ray.init(include_dashboard=False, _temp_dir=os.path.join(private, "ray"))


def _validated(recipe: str, overrides: Sequence[str], workers: int, max_failures: int) -> Config:
    """The recipe, validated for `workers` ranks before Ray starts anything."""
    if workers < 1:
        raise ConfigError("--ray-workers", workers, "must be 1 or more")
    if max_failures < 0:
        raise ConfigError("--ray-max-failures", max_failures, "must be 0 or more (-1 is not offered: a job that "
                          "can never fail never ends)")  # fmt: skip
    cfg = load_config(recipe, overrides)
    data.plan_batches(cfg, workers)
    validate(cfg)
    resume.refuse_fresh_start_over(cfg, checkpoint.candidates(Path(cfg.output_dir).resolve() / "checkpoints"))
    return cfg


def train_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker`: dtrain's loop on the process group Ray made. A restarted attempt
    continues from the newest checkpoint this job wrote (`_continue_an_earlier_attempt`)."""
    from dtrain.train import job
    from dtrain.train.fit import fit

    if os.path.isdir(config["cwd"]):  # relative data paths as where the command ran (when this node has it)
        os.chdir(config["cwd"])
    env = distributed.read_env()
    job.setup_logging(env.rank)
    cfg = load_config(config["recipe"], [*config["overrides"], *redact.private_overrides()])
    data.plan_batches(cfg, env.world_size)
    device = distributed.init(env, cfg.train.collective_timeout_s)
    marker = Path(cfg.output_dir) / f".ray-{config['job_id']}"
    _continue_an_earlier_attempt(cfg, marker, env.rank)
    try:
        outcome = fit(cfg, env, device)
    except BaseException as e:
        line, _ = job.explain(e, cfg)
        if line:  # a known failure: its line, not a traceback (Ray then restarts or reports it)
            print(shown(line, env.rank), file=sys.stderr, flush=True)
            raise RuntimeError(line) from None
        raise
    if outcome.status == "preempted":  # Ray's own restart continues it from the checkpoint just written
        raise RuntimeError(f"preempted by signal {outcome.signum} after a checkpoint")
    if env.rank == 0:
        marker.unlink(missing_ok=True)
