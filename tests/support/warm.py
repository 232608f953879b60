"""Warm interpreters for the suite's dtrain commands: ranks forked from processes that have
imported torch, dtrain and MLflow once, instead of interpreters that import them anew.

A rank's start-up is most of a short test job's cost on a small machine: ~3.5 s of CPU to
import torch, `torch._dynamo` (the optimizer imports it) and dtrain, 2 s more for MLflow on
rank 0, ~2 s for torchrun's agent; the training itself is often less. Each pytest worker keeps
a few *zygotes* (`POOL`), each started once with the environment every test command gets
(`helpers.env_for_cli`). A command on N ranks asks N of them to fork a rank each, which becomes
what torchrun would have started: the environment torchrun gives a worker (`RANK`,
`MASTER_PORT`, `TORCHELASTIC_RUN_ID`, ...; `tests/runtime/test_warm.py` compares the two), the
test's environment, working directory, `sys.path` and `-W` filters, then `python -m dtrain
ARGS`. Separate zygotes keep what differs between real processes different: each has its own
hash seed (str hashes, set order). The ranks of a job come from different zygotes, and the next
job starts one zygote further on, so rank 0 of a resumed run hashes unlike the run it resumes,
as under torchrun.

What the ranks do not get is torchrun's agent: no restarts, no signal forwarding, no failure
summary. This runner stands in for the agent like `torch.multiprocessing.spawn` would: ranks
started together, the first to fail ends the others, exit 1 if any rank failed. The tests of
the launch itself (the launchers, faults, elastic jobs, hosts, preemption, `dtrain train
--nproc-per-node`) run torchrun: `helpers.run_dtrain(..., warm=False)` or their own command lines.
"""

from __future__ import annotations

import atexit
import base64
import gc
import itertools
import json
import multiprocessing
import os
import pickle
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from pathlib import Path

# Imported by the zygote before it serves: what every dtrain command imports. Not deepspeed,
# transformers or Ray: they read their environment (DS_ACCELERATOR, HF_HOME, ...) on import.
PRELOAD = (
    "torch",
    "torch._dynamo",
    "torch.distributed",
    "torch.distributed.elastic.multiprocessing.errors",
    "mlflow",
    "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store",
    "dtrain",
    "dtrain.cli",
    "dtrain.train.fit",
    "dtrain.engines.ddp",
    "dtrain.engines.fsdp",
    "dtrain.tasks.cnn",
    "dtrain.tasks.transformer",
    "dtrain.tracking.mlflow_tracker",
)


# ---------------------------------------------------------------- zygote (its own process)


def _serve(path: str, parent: int) -> None:
    for name in PRELOAD:
        __import__(name)
    base_path = [p for p in sys.path[1:] if p not in os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    filters = list(warnings.filters)
    gc.collect()
    gc.freeze()  # a forked rank's collections then leave the zygote's objects (and their pages) alone
    server = socket.socket(socket.AF_UNIX)
    server.bind(f"{path}.new")
    server.listen(64)
    os.rename(f"{path}.new", path)  # the path appears once it takes connections: what the client waits for
    server.settimeout(1.0)
    signal.signal(signal.SIGCHLD, lambda *_: _reap())
    while os.getppid() == parent:  # the pytest worker gone: so is its zygote
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        while chunk := conn.recv(1 << 16):  # the rest of the job, up to the client's half-close
            msg += chunk
        if os.fork() == 0:
            server.close()
            _watch(conn, json.loads(msg.lstrip(b"\0")), fds, base_path, filters)
        conn.close()
        for fd in fds:
            os.close(fd)


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _watch(conn: socket.socket, job: dict, fds: list[int], base_path: list, filters: list) -> None:
    """Between zygote and rank: forks the rank, tells the client its pid, then its exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _rank(job, fds, base_path, filters)
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    conn.sendall(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
    os._exit(0)


def _rank(job: dict, fds: list[int], base_path: list, filters: list) -> None:
    """Become `python -m MODULE ARGS` started in `job`'s directory with `job`'s environment
    (or a process that calls a function, as `torch.multiprocessing.spawn` starts one)."""
    code: int = 1
    try:
        os.setpgid(0, 0)  # its own group, as a rank under torchrun: a kill reaches its loader workers
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        user_path = [p for p in job["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        # A function gets its caller's path, as spawn gives it; a module, what `python -m` makes.
        sys.path[:] = job.get("path") or [os.getcwd(), *user_path, *base_path]
        warnings.filters[:] = filters
        sys.warnoptions[:] = [w for w in job["env"].get("PYTHONWARNINGS", "").split(",") if w]
        warnings._processoptions(sys.warnoptions)  # type: ignore[attr-defined]  # what startup does with -W
        if job["env"].get("OMP_NUM_THREADS"):  # read by a fresh process's OpenMP when it loads
            import torch

            torch.set_num_threads(int(job["env"]["OMP_NUM_THREADS"]))
        try:
            if "call" in job:  # a function, with the caller's authkey, as spawn gives it
                multiprocessing.current_process().authkey = base64.b64decode(job["authkey"])  # its Manager's proxies
                fn, args = pickle.loads(base64.b64decode(job["call"]))  # nosec B301 # the test's own function
                fn(*args)
            else:
                sys.argv[:] = ["-m", *job["args"]]
                runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


# ---------------------------------------------------------------- client (the pytest worker)

_zygotes: dict[int, tuple[subprocess.Popen, str]] = {}
_lock = threading.Lock()
_jobs = itertools.count()
POOL = 3
"""Zygotes a pytest worker keeps (more when a job has more ranks): one more than the 2 ranks of
most jobs, so that consecutive jobs give rank 0 different interpreters."""


def _zygote(index: int, env: dict[str, str]) -> str:
    """The socket of zygote `index`, started on first use (with `env`, the tests' environment)."""
    with _lock:
        if index not in _zygotes:
            path = os.path.join(tempfile.mkdtemp(prefix="dtrain-warm-"), "zygote.sock")
            # Per rank, not here: -W filters, and the threads (OpenMP reads OMP_NUM_THREADS when
            # it loads, so the zygote loads it with the machine's default, as a fresh process would).
            zenv = {k: v for k, v in env.items() if k not in ("PYTHONWARNINGS", "OMP_NUM_THREADS")}
            with open(os.path.join(os.path.dirname(path), "zygote.log"), "w") as log:
                proc = subprocess.Popen(
                    [sys.executable, __file__, path, str(os.getpid())],
                    env=zenv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # a test's killpg of its own group never reaches it
                )
            _zygotes[index] = (proc, path)
        proc, path = _zygotes[index]
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        if proc.poll() is not None:
            log = Path(path).with_name("zygote.log").read_text()[-2000:]
            raise RuntimeError(f"warm zygote {index} exited with {proc.returncode}:\n{log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm zygote {index} did not start in 120 s")
        time.sleep(0.05)
    return path


@atexit.register
def _stop() -> None:
    for proc, path in _zygotes.values():
        proc.kill()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def _worker_env(env: dict[str, str], rank: int, nproc: int, port: int, run_id: str, errors: str) -> dict[str, str]:
    """What torchrun's agent adds to a worker's environment (LocalElasticAgent._start_workers),
    on this machine's loopback rendezvous."""
    return {
        **env,
        "LOCAL_RANK": str(rank),
        "RANK": str(rank),
        "GROUP_RANK": "0",
        "ROLE_RANK": str(rank),
        "ROLE_NAME": "default",
        "LOCAL_WORLD_SIZE": str(nproc),
        "WORLD_SIZE": str(nproc),
        "GROUP_WORLD_SIZE": "1",
        "ROLE_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_RUN_ID": run_id,
        "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
        "TORCHELASTIC_ERROR_FILE": os.path.join(errors, str(rank), "error.json"),
        # torchrun sets it in its own environment (from --signals-to-handle), which workers inherit.
        "TORCHELASTIC_SIGNALS_TO_HANDLE": env.get("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT"),
    }


def _start(index: int, job: dict, out: int, err: int):
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(_zygote(index, job["env"]))
    with open(os.devnull) as null:
        socket.send_fds(conn, [b"\0"], [null.fileno(), out, err])  # the rank's stdin, stdout, stderr
    conn.sendall(json.dumps(job).encode())
    conn.shutdown(socket.SHUT_WR)  # the job's end; the answers come back on the same socket
    reader = conn.makefile("r")
    pid = json.loads(reader.readline())["pid"]
    return conn, reader, pid


def run(
    args: list[str],
    cwd: Path,
    env: dict[str, str],
    nproc: int = 0,
    timeout: float = 600,
    module: str = "dtrain",
    job: str = "",
) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` (nproc 0), or on `nproc` ranks as torchrun would start them (the
    rendezvous id `job`, else a fresh one, as `dtrain train --nproc-per-node` gives)."""
    from helpers import free_port

    port, run_id = free_port(), job or uuid.uuid4().hex
    with tempfile.TemporaryDirectory() as errors:
        jobs = []
        for rank in range(max(nproc, 1)):
            if nproc:
                os.makedirs(os.path.join(errors, str(rank)))
            rank_env = _worker_env(env, rank, nproc, port, run_id, errors) if nproc else env
            jobs.append({"module": module, "args": args, "cwd": str(cwd), "env": rank_env})
        codes, stdout, stderr = _run_jobs(jobs, timeout, args)
        stderr += "".join(_failure_summary(errors, rank) for rank, c in enumerate(codes) if nproc and c != 0)
    code = codes[0] if not nproc else (0 if all(c == 0 for c in codes) else 1)
    return subprocess.CompletedProcess([module, *args], code, stdout, stderr)


def _failure_summary(errors: str, rank: int) -> str:
    """What torchrun's agent prints of a failed rank: the message its error file holds (dtrain's
    line or `@record`'s traceback), so that a line the rank wrote there is seen even when another
    rank's failure ended it before it printed."""
    try:
        message = json.loads(Path(errors, str(rank), "error.json").read_text())["message"]
    except (OSError, ValueError, KeyError):
        return ""
    text = message.get("message", "") if isinstance(message, dict) else str(message)
    return f"[rank {rank}] error: {text}\n" if text else ""


def call(fn, per_rank: list[tuple], timeout: float = 600) -> None:
    """fn(*per_rank[i]) in one warm process per rank, with this process's environment, working
    directory and path; their output is printed here, and a rank that failed fails the caller."""
    authkey = base64.b64encode(multiprocessing.current_process().authkey).decode()
    here = {"cwd": os.getcwd(), "env": dict(os.environ), "path": list(sys.path), "authkey": authkey}
    jobs = [{**here, "call": base64.b64encode(pickle.dumps((fn, args))).decode()} for args in per_rank]
    codes, stdout, stderr = _run_jobs(jobs, timeout, [fn.__qualname__])
    sys.stdout.write(stdout)
    sys.stderr.write(stderr)
    if any(codes):
        raise AssertionError(f"{fn.__qualname__}: ranks exited with {codes}:\n{stderr[-6000:]}")


def _run_jobs(jobs: list[dict], timeout: float, args: list[str]) -> tuple[list[int], str, str]:
    """Each job's rank started from a zygote of its own; their exit codes and joint output."""
    first = next(_jobs)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = []
        for rank, job in enumerate(jobs):
            zygote = (first + rank) % max(POOL, len(jobs) + 1)
            started.append(_start(zygote, job, out.fileno(), err.fileno()))
        codes = _join(started, timeout, args)
        out.seek(0)
        err.seek(0)
        return codes, out.read().decode(errors="replace"), err.read().decode(errors="replace")


MONITOR_INTERVAL = 0.1
"""How often the ranks are looked at, as torchrun's agent does (`--monitor-interval`'s default):
a rank that exits with an error a moment before another prints its own line leaves it that long."""


def _join(started: list, timeout: float, args: list[str]) -> list[int]:
    """Each rank's exit status; the first rank to fail ends the others (SIGTERM, then SIGKILL
    after 30 s, as torchrun's agent does), and so does the timeout."""
    codes: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    all_done = threading.Event()

    def wait(i: int, reader) -> None:
        line = reader.readline()
        codes[i] = json.loads(line)["status"] if line else -signal.SIGKILL
        if len(codes) == len(started):
            all_done.set()

    threads = [threading.Thread(target=wait, args=(i, r), daemon=True) for i, (_, r, _) in enumerate(started)]
    for t in threads:
        t.start()
    ended_at = None
    while not all_done.wait(MONITOR_INTERVAL):  # a job that ends well returns at once
        failed = any(c != 0 for c in codes.values())
        late = time.monotonic() > deadline
        if (failed or late) and ended_at is None:
            ended_at = time.monotonic()
            _signal(started, codes, signal.SIGTERM)
        if ended_at is not None and time.monotonic() - ended_at > (0 if late else 30):
            _signal(started, codes, signal.SIGKILL)
        if late and time.monotonic() - deadline > 5:
            raise subprocess.TimeoutExpired(args, timeout)
    for conn, reader, _ in started:
        reader.close()
        conn.close()
    return [codes[i] for i in range(len(started))]


def _signal(started: list, codes: dict[int, int], sig: int) -> None:
    for i, (_, _, pid) in enumerate(started):
        if i not in codes:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
