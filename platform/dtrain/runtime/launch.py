"""Starting dtrain on several ranks of this machine under torchrun: the command line and the
environment the agent needs. Used by `--nproc-per-node`, the sweep and the search's trials."""

from __future__ import annotations

import os
import sys
import uuid
from typing import Sequence


def torchrun_cmd(
    nproc: int, recipe: str, overrides: Sequence[str], max_restarts: int = 0, command: Sequence[str] = ("train",)
) -> list[str]:
    """`dtrain train` (or another `command`) on `nproc` ranks of this machine under torchrun."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        # torchrun's --standalone, with its store on loopback: nothing of the job is reachable
        # from another host (dtrain.runtime.rendezvous).
        "--nnodes=1",
        "--rdzv-backend=dtrain",
        "--rdzv-endpoint=127.0.0.1:0",
        f"--rdzv-id={uuid.uuid4().hex}",
        "--local-addr=127.0.0.1",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m",
        "dtrain",
        *command,
        recipe,
        *overrides,
    ]


def torchrun_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (this environment) for a torchrun agent, with restarts made safe (the agent's
    own store, lent to the workers by default, keeps a dead attempt's keys: pytorch#135712)
    and SIGUSR1, SLURM's preemption notice, forwarded to the workers like SIGTERM."""
    return {
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        **(os.environ if base is None else base),
    }


def exec_torchrun(
    nproc: int, recipe: str, overrides: Sequence[str], command: Sequence[str], env: dict[str, str] | None = None
) -> None:
    """Replace this process with a torchrun agent running `command` on `nproc` ranks, with `env`
    added to its environment. Called once the recipe was validated in this one process, so bad
    input never reaches torchrun (whose agent would add its own failure report)."""
    sys.stdout.flush()
    cmd = torchrun_cmd(nproc, recipe, overrides, command=command)
    os.execve(sys.executable, cmd, {**torchrun_env(), **(env or {})})  # nosec B606 # this interpreter running torchrun, no shell
