"""Preemption: a stop request by signal, turned into a checkpoint at a step boundary.

Kubernetes (pod deletion, node drain, spot reclaim) sends SIGTERM and SIGKILLs after the
grace period (30 s by default); SLURM sends the signal named by `--signal` (SIGUSR1 in
dtrain's batch script) before the time limit; torchrun forwards the signals it handles to
its workers. The handler only records the signal: the loop asks `requested()` after each
step, the ranks agree (one tiny all-reduce on the side gloo group, so a GPU stream is never
synchronised for it), and every rank checkpoints after the same step and exits.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

import torch

from dtrain import distributed

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []
_in_loop = False
_holding = False


class SignalInterrupt(KeyboardInterrupt):
    """A stop signal outside the training loop: unwind now (the MLflow run ends KILLED)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _handle(signum: int, frame: object) -> None:
    _received.append(signum)
    if not _in_loop and not _holding:
        raise SignalInterrupt(signum)


def hold() -> None:
    """From now on only record stop signals: the job is already ending (an error, or its last
    MLflow flush), and the launcher's SIGTERM must not cut that short or change its outcome."""
    global _holding
    _holding = True


def install() -> None:
    """Handle SIGTERM / SIGUSR1 (main thread only, as Python requires)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _handle)


@contextlib.contextmanager
def at_step_boundaries() -> Iterator[None]:
    """Inside: a stop signal is only recorded, and acted on after the step (`requested`)."""
    global _in_loop
    _in_loop = True
    try:
        yield
    finally:
        _in_loop = False
_holding = False


def requested() -> bool:
    """Collective: True on every rank when any rank has received a stop signal."""
    local = torch.tensor([1 if _received else 0], dtype=torch.int32)
    if distributed.world_size() > 1:
        distributed.all_reduce_max(local, group=distributed.side_group())
    return bool(local.item())


def signal_number() -> int:
    """The signal received here (SIGTERM if this rank stops because another rank got one)."""
    return _received[0] if _received else int(signal.SIGTERM)
