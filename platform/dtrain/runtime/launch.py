"""Starting dtrain on several ranks of this machine under torchrun: the command line and the
environment the agent needs. Used by `--nproc-per-node`, the sweep and the search's trials."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from typing import Any, Sequence


def torchrun_cmd(
    nproc: int, recipe: str, overrides: Sequence[str], max_restarts: int = 0, command: Sequence[str] = ("train",)
) -> list[str]:
    """`dtrain train` (or another `command`) on `nproc` ranks of this machine under torchrun."""
    return [*torchrun_launcher(nproc, max_restarts), "-m", "dtrain", *command, recipe, *overrides]


def torchrun_launcher(nproc: int, max_restarts: int = 0) -> list[str]:
    """torchrun on `nproc` ranks of this machine, before the script or `-m module` it starts:
    torchrun's --standalone, with its store on loopback (dtrain.runtime.rendezvous), so nothing
    of the job is reachable from another host (`--standalone` listens on every interface)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--rdzv-backend=dtrain",
        "--rdzv-endpoint=127.0.0.1:0",
        f"--rdzv-id={uuid.uuid4().hex}",
        "--local-addr=127.0.0.1",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}",
    ]


def threads_per_rank(nproc: int) -> int:
    """Intra-op threads for each of `nproc` ranks on this host: the cores this process may use,
    shared out. A lone process gets them all, as torch gives it by default; torchrun's own
    default for several ranks is 1 whatever the host, so 1 process and 2 ranks on 2 cores ran
    with 2 and 1+1 threads but 2 ranks on 16 cores with 1+1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, nproc))


def rank_threads(nproc: int) -> int:
    """The threads each of `nproc` ranks dtrain starts here runs with: `OMP_NUM_THREADS` where
    the user set it, else `threads_per_rank`."""
    return int(os.environ.get("OMP_NUM_THREADS") or threads_per_rank(nproc))


def torchrun_env(base: dict[str, str] | None = None, nproc: int = 0) -> dict[str, str]:
    """`base` (this environment) for a torchrun agent, with restarts made safe (the agent's
    own store, lent to the workers by default, keeps a dead attempt's keys: pytorch#135712)
    and SIGUSR1, SLURM's preemption notice, forwarded to the workers like SIGTERM. With
    `nproc`, each rank gets `threads_per_rank(nproc)` threads unless `OMP_NUM_THREADS` is set."""
    env = {
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        **(os.environ if base is None else base),
    }
    if nproc and not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(threads_per_rank(nproc))
    return env


def run_torchrun(
    nproc: int, recipe: str, overrides: Sequence[str], command: Sequence[str], env: dict[str, str] | None = None
) -> int:
    """Be the torchrun agent of `command` on `nproc` ranks, with `env` added to this process's
    environment; the exit code. Called once the recipe was validated in this one process, so bad
    input never reaches torchrun. The agent runs here rather than replacing this process so
    that dtrain's line, not torchrun's failure report and its traceback, is the last thing
    printed, whatever the outcome: a rank's error (the line it wrote to its error file), a rank
    killed, or the job stopped by a signal."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    sys.stdout.flush()
    os.environ.update({**torchrun_env(nproc=nproc), **(env or {})})
    args = torchrun.parse_args(torchrun_cmd(nproc, recipe, overrides, command=command)[3:])  # after `-m torchrun`
    try:
        torchrun.run(args)
        return 0
    except SignalException as e:  # the agent was told to stop: it passed the signal on to the ranks
        sig = signal.Signals(e.sigval)
        print(stopped_line(sig), file=sys.stderr, flush=True)
        return 128 + sig.value
    except ChildFailedError as e:
        line, code = failure_line(*e.get_first_failure())
        print(line, file=sys.stderr, flush=True)
        return code


def stopped_line(sig: signal.Signals) -> str:
    """The last line of a job stopped by `sig`, sent to the agent or to a rank: the same line."""
    return (f"dtrain: stopped by {sig.name}; continue with resume=auto (the ranks' lines above name the step "
            "of their last checkpoint)")  # fmt: skip


def failure_line(rank: int, failure: Any) -> tuple[str, int]:
    """The closing line and exit code for the rank that failed first (torchrun's `ProcessFailure`:
    its error file's message, or its exit code)."""
    from dtrain.runtime import preemption

    message, code = failure.message, failure.exitcode
    if code < 0:  # killed by a signal
        return f"dtrain: error: rank {rank} was killed by {signal.Signals(-code).name}", 128 - code
    text = str(message.get("message", "")) if isinstance(message, dict) else ""
    if not text and code - 128 in {s.value for s in preemption.SIGNALS}:  # dtrain's stop: checkpoint, 128 + sig
        return stopped_line(signal.Signals(code - 128)), code
    if text.startswith("dtrain"):  # dtrain's own line, which the rank wrote to its error file
        return text, code or 1
    first = text.strip().splitlines()[-1] if text.strip() else f"exit code {code}"
    return f"dtrain: error: rank {rank} failed: {first} (its traceback is above)", code or 1
