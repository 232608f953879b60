"""Several multi-rank jobs logging into one MLflow server at the same time: does the store keep
every metric point and end every run FINISHED? PostgreSQL-backed (2 server workers) against
SQLite-backed (the default store of launchers/mlflow_server.sh), same load, side by side.

    python benchmarks/tracking_load.py [--jobs 4] [--nproc 2] [--steps 40] [--rounds 1]
                                      [--clients 16] [--points 200]

Each job is `dtrain train recipes/cnn_digits.yaml` under torchrun, logging every step; each
run's `dtrain.metric_points` tag (the points its tracker sent) is compared with the points
the server returns. tests/test_tracking_server.py runs the same functions at a smaller size.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dtrain.runtime.launch import torchrun_launcher

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "cnn_digits.yaml"
PY = sys.executable


@dataclass
class Server:
    """launchers/mlflow_server.sh, running; `stop()` ends it (and its PostgreSQL)."""

    proc: subprocess.Popen
    uri: str
    root: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # its trap stops mlflow and pg_ctl stop
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(backend: str, root: Path, workers: int = 2, timeout_s: float = 120, *extra: str) -> Server:
    """The one-command launcher: SQLite, or a local PostgreSQL cluster with `--postgres`."""
    port = free_port()
    cmd = [
        "bash",
        str(ROOT / "launchers" / "mlflow_server.sh"),
        "--dir",
        str(root),
        "--port",
        str(port),
        "--workers",
        str(workers),
        *extra,
    ] + (["--postgres"] if backend == "postgres" else [])
    log = open(root.parent / f"{root.name}-launcher.log", "w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "PYTHON": PY}
    )
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        text = Path(log.name).read_text()
        if "export MLFLOW_TRACKING_URI=" in text:
            uri = text.split("export MLFLOW_TRACKING_URI=")[1].split()[0]
            return Server(proc, uri, root)
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"mlflow_server.sh did not start:\n{Path(log.name).read_text()[-3000:]}")


def job_cmd(nproc: int, uri: str, experiment: str, name: str, out: Path, steps: int, *extra: str) -> list[str]:
    launcher = torchrun_launcher(nproc) if nproc > 1 else [PY]
    return [
        *launcher,
        "-m",
        "dtrain",
        "train",
        str(RECIPE),
        f"train.max_steps={steps}",
        "tracking.log_every=1",
        "train.eval_every_steps=0",
        "checkpoint.every_steps=0",
        "data.augment=false",
        f"tracking.uri={uri}",
        f"tracking.experiment={experiment}",
        f"tracking.run_name={name}",
        f"output_dir={out}",
        *extra,
    ]


def run_jobs(
    cmds: list[list[str]], cwd: Path, env: dict[str, str] | None = None, timeout_s: float = 900
) -> tuple[float, list[subprocess.CompletedProcess]]:
    """Start every command at once; wall time until the last ends, and each one's result."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds
    ]
    done = [subprocess.CompletedProcess(p.args, p.wait(timeout=timeout_s), *p.communicate()) for p in procs]
    return time.perf_counter() - start, done


def audit(uri: str, experiment: str, names: set[str] | None = None) -> list[dict]:
    """Per run (or per run named in `names`): its status, the points its tracker says it sent,
    and the points the server has."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    rows = []
    for run in client.search_runs([exp.experiment_id]) if exp else []:
        if names is not None and run.info.run_name not in names:
            continue
        keys = [k for k in run.data.metrics if not k.startswith("system/")]
        histories = {k: client.get_metric_history(run.info.run_id, k) for k in keys}
        rows.append(
            {
                "name": run.info.run_name,
                "run_id": run.info.run_id,
                "status": run.info.status,
                "sent": int(run.data.tags.get("dtrain.metric_points", -1)),
                "stored": sum(len(h) for h in histories.values()),
                "steps": {k: sorted(m.step for m in h) for k, h in histories.items()},
            }
        )
    return rows


def _unbatched_client(args: tuple[str, str, int, int]) -> tuple[int, int]:
    """One client logging `points` metric points one HTTP call each (MLflow's fluent
    `log_metric` in a loop, as an unbatched training script does): (stored calls, errors)."""
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not a "View run at" line per run
    uri, experiment, index, points = args
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # count failures instead of hiding them in retries
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run_id = client.create_run(exp_id, run_name=f"client{index}").info.run_id
    ok = errors = 0
    for step in range(points):
        try:
            client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
            ok += 1
        except Exception:
            errors += 1
    client.set_terminated(run_id)
    return ok, errors


def unbatched(uri: str, clients: int, points: int) -> tuple[float, int, int]:
    """`clients` processes at once, each logging point by point: wall s, stored calls, errors."""
    import multiprocessing

    import mlflow

    mlflow.MlflowClient(uri).create_experiment("unbatched")
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(clients) as pool:
        out = pool.map(_unbatched_client, [(uri, "unbatched", i, points) for i in range(clients)])
    return time.perf_counter() - start, sum(o[0] for o in out), sum(o[1] for o in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--clients", type=int, default=16, help="unbatched clients for the second table")
    ap.add_argument("--points", type=int, default=200, help="points per unbatched client")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(
        f"{args.jobs} jobs x {args.nproc} ranks at once, {args.steps} steps, logging every step; "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}\n"
    )
    print("| store | round | wall s | runs FINISHED | points sent | points stored | missing | job failures |")
    print("|---|---|---|---|---|---|---|---|")
    for backend in ("postgres", "sqlite"):
        for rnd in range(args.rounds):
            tmp = Path(tempfile.mkdtemp(prefix=f"dtrain-load-{backend}-"))
            os.chmod(tmp, 0o755)  # PostgreSQL runs as `postgres`: it must enter the folder
            server = start_server(backend, tmp / "server")
            try:
                cmds = [
                    job_cmd(args.nproc, server.uri, "load", f"job{i}", tmp / f"job{i}", args.steps)
                    for i in range(args.jobs)
                ]
                wall, results = run_jobs(cmds, tmp, env)
                rows = audit(server.uri, "load")
            finally:
                server.stop()
            finished = sum(r["status"] == "FINISHED" for r in rows)
            sent, stored = sum(r["sent"] for r in rows), sum(r["stored"] for r in rows)
            failures = sum(r.returncode != 0 for r in results)
            warned = sum("MLflow tracking" in r.stderr for r in results)
            print(
                f"| {backend} | {rnd + 1} | {wall:.1f} | {finished}/{args.jobs} | {sent} | {stored} | "
                f"{sent - stored} | {failures} (tracking warnings: {warned}) |",
                flush=True,
            )
    print(f"\n{args.clients} clients at once, each {args.points} points one call each (no batching, no retries)\n")
    print("| store | wall s | calls/s | stored | errors |")
    print("|---|---|---|---|---|")
    for backend in ("postgres", "sqlite"):
        tmp = Path(tempfile.mkdtemp(prefix=f"dtrain-load-{backend}-"))
        os.chmod(tmp, 0o755)
        server = start_server(backend, tmp / "server")
        try:
            wall, ok, errors = unbatched(server.uri, args.clients, args.points)
        finally:
            server.stop()
        print(
            f"| {backend} | {wall:.1f} | {ok / wall:.0f} | {ok}/{args.clients * args.points} | {errors} |", flush=True
        )


if __name__ == "__main__":
    main()
