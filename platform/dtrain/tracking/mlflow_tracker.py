"""MLflow tracking: one run per job, written by rank 0 only, asynchronously, never fatal.

The training loop only enqueues; a daemon thread talks to the store. If the store is
unreachable or fails mid-run, one warning is printed and training carries on. While the
store is down, what is queued is dropped rather than retried one slow call at a time (so a
dead store never delays the end of training); every `RETRY_AFTER_S` one call probes it
again. `finish` waits a bounded time for the queue to drain, then marks the run
FINISHED, FAILED or KILLED.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from dtrain.config import Config, redact
from dtrain.runtime.files import first_line

log = logging.getLogger("dtrain")

DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow's own default: one store in the launch directory
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
MAX_METRICS_PER_BATCH = 1000
RETRY_AFTER_S = 30.0
FLUSH_EVERY_S = 5.0  # metrics are sent in one batch per interval: one store transaction, not one per log


def resolve_uri(uri: str) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _bound_http_retries() -> None:
    # MLflow's HTTP client retries for minutes by default; an outage should cost seconds.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def open_client(uri: str) -> Any:
    """An `MlflowClient` for `uri`. Opening a new SQLite store creates its tables (MLflow runs
    its schema migrations), and processes doing so at once fail ("table ... already exists"):
    two runs, a search's workers, or a run and `mlflow ui` started together. An exclusive lock
    on the database file lets the first create them while the others wait. (SQLite's own
    locks are fcntl locks; `flock` is a separate lock on Linux, so they do not interfere.)"""
    import mlflow
    from sqlalchemy.engine import make_url

    database = make_url(uri).database if uri.startswith("sqlite:") else None
    if not database or database == ":memory:":
        return mlflow.MlflowClient(uri)
    with open(database, "a") as f:  # SQLite takes an empty file as a new database
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        return mlflow.MlflowClient(uri)


def git_commit() -> str | None:
    for where in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            out = subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=where,
                capture_output=True,  # nosec B603 B607 # git, fixed argv
                text=True,
                timeout=5,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def _lower_thread_priority() -> None:
    """Linux nice values are per thread: let the training threads win the CPU."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def experiment_id(client: Any, uri: str, name: str) -> str:
    """The id of experiment `name`, created if missing (with a SQLite store, its artifacts go
    beside the database instead of into whatever directory the job runs from)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    artifact_location = None
    if uri.startswith("sqlite:///"):
        artifact_location = (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location))
    except Exception:
        exp = client.get_experiment_by_name(name)  # created meanwhile by a concurrent job
        if exp is None:
            raise
        return str(exp.experiment_id)


class NullTracker:
    """What every rank but 0 (and rank 0 with tracking off or broken at start) gets."""

    run_id: str | None = None
    uri: str | None = None

    def links(self) -> str | None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    run_id: str
    uri: str
    experiment_id: str

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, Any],
        run_id: str | None = None,
        system_metrics: bool = False,
    ):
        """Create (or, with `run_id`, reopen) the run synchronously: its id goes into checkpoints."""
        _bound_http_retries()
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its schema-migration chatter
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = uri
        self.client = open_client(uri)
        self.run_id = ""
        try:
            earlier_points = self._reopen(run_id) if run_id else self._create(experiment, run_name, params, tags)
        except BaseException as e:  # a stop signal or an error while the run is being opened
            if self.run_id:  # it exists and is RUNNING: it must not stay so
                with _sigterm_deferred(), contextlib.suppress(Exception):
                    self.client.set_terminated(self.run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        self._queue: queue.Queue[list[Any] | Callable[[], object] | None] = queue.Queue(maxsize=100_000)
        self._warned = False
        self._down_until = 0.0  # monotonic time before which the store is treated as down
        self.dropped = 0
        self.points = earlier_points  # metric points handed to the queue, stored as a tag at the end: auditable
        self._thread = threading.Thread(target=self._work, name="dtrain-mlflow", daemon=True)
        self._thread.start()
        self._monitor = None
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(
                    self.run_id, sampling_interval=10, resume_logging=bool(run_id), tracking_uri=uri
                )
                self._monitor.start()
            except Exception as e:  # optional extra: never fatal
                self._warn(f"system metrics off: {e}")

    def _reopen(self, run_id: str) -> int:
        """Mark an earlier attempt's run RUNNING again; returns the metric points it stored
        (those of attempts that reached `finish`: a killed one never wrote its count)."""
        self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self.client.set_tag(run_id, "dtrain.resumed", "true")
        previous = self.client.get_run(run_id)
        self.experiment_id = str(previous.info.experiment_id)
        return int(previous.data.tags.get("dtrain.metric_points", 0))

    def _create(self, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, Any]) -> int:
        """A new run with its tags and params (in batches MLflow accepts); returns 0 points."""
        from mlflow.entities import Param

        self.experiment_id = experiment_id(self.client, self.uri, experiment)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
        return 0

    def links(self) -> str | None:
        """Where the run is in the MLflow UI (an HTTP server only). An experiment's page opens
        on its overview; the runs table and a run's charts have their own routes."""
        if not self.uri.startswith(("http://", "https://")):
            return None
        exp = f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}"
        return f"mlflow run: {exp}/runs/{self.run_id} | all runs: {exp}/runs"

    def _warn(self, msg: str | BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "MLflow tracking at %s failed (training continues, later errors are not shown): %s",
                self.uri,
                first_line(msg) if isinstance(msg, BaseException) else str(msg)[:300],
            )

    def _work(self) -> None:
        _lower_thread_priority()
        pending: list[Any] = []
        last_flush = time.monotonic()
        while True:
            wait = max(0.0, FLUSH_EVERY_S - (time.monotonic() - last_flush)) if pending else None
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = []  # the interval is up: flush
            if isinstance(item, list):
                pending.extend(item)
            due = time.monotonic() - last_flush >= FLUSH_EVERY_S or len(pending) >= MAX_METRICS_PER_BATCH - 100
            if pending and (due or not isinstance(item, list)):  # flush before any other call: keeps order
                self._run(functools.partial(self.client.log_batch, self.run_id, metrics=pending))
                pending = []
                last_flush = time.monotonic()
            if item is None:
                return
            if callable(item):
                self._run(item)

    def _run(self, job: Callable[[], object], force: bool = False) -> None:
        if not force and time.monotonic() < self._down_until:
            self.dropped += 1
            return
        try:
            job()
        except Exception as e:
            self._warn(e)
            self._down_until = time.monotonic() + RETRY_AFTER_S
            self.dropped += 1

    def _submit(self, job: list[Any] | Callable[[], object]) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:  # the store is far behind: drop rather than block training
            self._warn("tracking queue full; dropping metrics")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.points += len(metrics)
        self._submit([Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._submit(lambda: self.client.log_batch(self.run_id, tags=items))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = str(path)
        self._submit(lambda: self.client.log_artifact(self.run_id, p, artifact_path))

    def finish(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        # When one rank dies, the others fail in a collective and come here while torchrun's
        # SIGTERM to them is on its way; it must not cut the last flush short (the agent's
        # SIGKILL after its grace period still bounds this).
        with _sigterm_deferred():
            self._finish(status, timeout_s)

    def _finish(self, status: str, timeout_s: float) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:
                self._warn(e)
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._warn(f"gave up flushing after {timeout_s:.0f}s; the run may show RUNNING")
            return
        # The final status is always attempted, even after an outage: it may be back. The
        # count of points sent lets anyone check the store kept every one (system/ excluded).
        self._run(lambda: self.client.set_tag(self.run_id, "dtrain.metric_points", str(self.points)), force=True)
        self._run(lambda: self.client.set_terminated(self.run_id, status=status), force=True)


@contextlib.contextmanager
def _sigterm_deferred() -> Iterator[None]:
    """Hold SIGTERM back for the duration; deliver it (to the handler restored) afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if received:
            signal.raise_signal(signal.SIGTERM)


PROBE_TIMEOUT_S = 5.0


def credentials(uri: str) -> str:
    """`uri` without its user:password, which go where MLflow reads them instead (its
    `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`, unless set already): the
    server's basic auth then works for every request, and the URI shown or logged holds none."""
    bare, user, password = redact.split(uri)
    if user or password:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
    if os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        redact.register(os.environ["MLFLOW_TRACKING_PASSWORD"])
    return bare


def probe(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """For a tracking server (http/https): None when it answers within `timeout_s`, else why
    not. The other ranks wait for rank 0 at start, so an unreachable or silent host must cost
    seconds, not MLflow's retries of ten-second requests."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()  # nosec B310 # http(s) only, checked above
    except urllib.error.HTTPError:
        return None  # it answered: reachable (a proxy may not serve /health)
    except Exception as e:
        reason = getattr(e, "reason", e)
        return f"no answer within {timeout_s:g}s ({reason})" if "timed out" in str(reason) else str(reason)
    return None


def start(cfg: Config, params: dict[str, Any], tags: dict[str, Any], run_id: str | None) -> NullTracker:
    """Rank 0: an MlflowTracker, or a NullTracker with one warning if the store is unusable."""
    if not cfg.tracking.enabled:
        return NullTracker()
    uri = credentials(resolve_uri(cfg.tracking.uri))
    if cfg.tracking.parent_run_id:  # MLflow shows it nested under that run
        tags = {**tags, "mlflow.parentRunId": cfg.tracking.parent_run_id}
    down = probe(uri)
    if down:
        log.warning("MLflow tracking at %s unavailable, training without it: %s", uri, down)
        return NullTracker()
    try:
        return MlflowTracker(
            uri,
            cfg.tracking.experiment,
            cfg.tracking.run_name or tags.get("dtrain.run_label", ""),
            params,
            tags,
            run_id=run_id,
            system_metrics=cfg.tracking.system_metrics,
        )
    except Exception as e:
        first = first_line(e)
        log.warning("MLflow tracking at %s unavailable, training without it: %s", uri, first)
        return NullTracker()
