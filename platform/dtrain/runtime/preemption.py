"""Preemption: a stop request by signal, turned into a checkpoint at a step boundary.

Kubernetes (pod deletion, node drain, spot reclaim) sends SIGTERM and SIGKILLs after the
grace period (30 s by default); SLURM sends the signal named by `--signal` (SIGUSR1 in
dtrain's batch script) before the time limit; torchrun forwards the signals it handles to
its workers. The handler only records the signal: the loop asks `requested(step)` after a
step, the ranks agree, and every rank checkpoints after the same step and exits.

The agreement is one tiny all-reduce on the side gloo group (a GPU stream is never
synchronised for it), started at one boundary without waiting and read at the next ask: by
then it has long completed, so no step waits on the slowest rank for it (a blocking one cost
7 % of a 14 ms step with 2 ranks). Even starting one costs ~0.3 ms, so the ranks ask every k
steps, about every `POLL_S` seconds: each answer also carries rank 0's k for the time the last
k steps took (evaluations and checkpoints included), and every rank reads the same answer after
the same step, so they ask, and stop, together. After a step that evaluated or checkpointed
(every rank alike) they ask at once. A signal is acted on at most ~2 x `POLL_S` plus a step
(and the evaluation or checkpoint in it) after it came.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Iterator

from dtrain.runtime import distributed

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []
_interrupted = False
_in_loop = False
_in_step = False
_holding = False
_grace_s = 0.0
_deadline: threading.Timer | None = None
_agreeing = distributed.LaggedMax()
"""The stop flag's agreement ([any signal, rank 0's next k]), started at one ask and read at the next."""
POLL_S = 0.1
"""About how often (seconds) the ranks ask one another whether a stop signal came."""
MAX_EVERY = 50
"""At most this many steps between two asks: steps that slow down by themselves (not an
evaluation or a checkpoint, after which the ranks ask at once) stretch one interval of k steps."""
_every = 1
"""Steps from one ask to the next (agreed: every rank reads it from the same answer)."""
_next_ask = 0
_last_ask = (0, 0.0)
"""(step, monotonic time) of the last ask (rank 0's clock sets the cadence)."""


class SignalInterrupt(KeyboardInterrupt):
    """A stop signal outside the training loop: unwind now (the MLflow run ends KILLED)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _handle(signum: int, frame: object) -> None:
    _received.append(signum)
    if not _in_loop and not _holding:
        raise SignalInterrupt(signum)
    if _in_step:
        _start_deadline(signum)


def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C: unwind now (KeyboardInterrupt), and remember it. Python ignores an exception
    raised while a finalizer or weakref callback runs (SQLAlchemy's, during a garbage
    collection): such a Ctrl-C is raised again at the next step boundary, not lost."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def _raise_if_interrupted() -> None:
    if _interrupted and not _holding:
        raise KeyboardInterrupt


def _start_deadline(signum: int) -> None:
    """A rank stuck inside a step (a hung collective, a stalled read) never reaches the
    boundary: rather than let the launcher wait out its kill timeout, it gives up."""
    global _deadline
    if not _holding and _deadline is None and _grace_s > 0:
        _deadline = threading.Timer(_grace_s, _give_up, (signum,))
        _deadline.daemon = True
        _deadline.start()


def _cancel_deadline() -> None:
    global _deadline
    if _deadline is not None:
        _deadline.cancel()
        _deadline = None


@contextlib.contextmanager
def step() -> Iterator[None]:
    """One training step: only here does the grace timer run. Evaluation and checkpoint
    writing between steps take what they take (a healthy rank evaluating for longer than
    the grace period is not stuck); a signal received then arms the timer for the next step."""
    global _in_step
    _raise_if_interrupted()
    if _received:
        _start_deadline(_received[0])
    _in_step = True
    try:
        yield
    finally:
        _in_step = False
        _cancel_deadline()  # the rank reached the boundary


def _give_up(signum: int) -> None:
    sys.stderr.write(
        f"dtrain[rank {distributed.rank()}]: signal {signum} received, but this rank did not reach a step boundary "
        f"within train.collective_timeout_s={_grace_s:g}s (stuck in a step); exiting without a "
        "checkpoint\n"
    )
    sys.stderr.flush()
    os._exit(128 + signum)


def hold() -> None:
    """From now on only record stop signals: the job is already ending (an error, or its last
    MLflow flush), and the launcher's SIGTERM must not cut that short or change its outcome."""
    global _holding
    _holding = True


def install() -> None:
    """Handle SIGTERM / SIGUSR1, and SIGINT (main thread only, as Python requires)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _handle)
        signal.signal(signal.SIGINT, _interrupt)


@contextlib.contextmanager
def at_step_boundaries(grace_s: float = 0.0) -> Iterator[None]:
    """Inside: a stop signal is only recorded, and acted on after the step (`requested`). A
    rank that has not reached the next boundary `grace_s` after the signal exits (0: waits)."""
    global _in_loop, _grace_s, _agreeing, _every, _next_ask, _last_ask
    _in_loop, _grace_s, _agreeing = True, grace_s, distributed.LaggedMax()  # none left from an earlier run
    _every, _next_ask, _last_ask = 1, 0, (0, time.monotonic())
    try:
        yield
    finally:
        _in_loop = False


def requested(step: int, slow: bool = False) -> bool:
    """Collective: True on every rank, after the same step, when any rank had received a stop
    signal by the previous ask (on one process: by this step's end). `slow`: this step also
    evaluated or checkpointed (on every rank alike), so the ranks ask now."""
    global _every, _next_ask, _last_ask
    _cancel_deadline()  # at a boundary: the checkpoint may take what it takes
    if distributed.world_size() == 1:
        return bool(_received)
    if step < _next_ask and not slow:
        return False
    answer = _agreeing.read()
    if answer is not None and answer[0]:
        return True
    _every = answer[1] if answer else 1
    now, (last_step, last_t) = time.monotonic(), _last_ask
    pace = max(1, min(MAX_EVERY, int(POLL_S * (step - last_step) / max(now - last_t, 1e-6)))) if step > last_step else 1
    _agreeing.start([int(bool(_received)), pace if distributed.is_main() else 0])
    _next_ask, _last_ask = step + _every, (step, now)
    return False


def settle() -> None:
    """After the loop, on every rank: the agreement still in flight is completed, so the
    collectives that follow on the side group pair up (its answer no longer matters: the
    run checkpoints at its end anyway)."""
    _agreeing.drain()


def signal_number() -> int:
    """The signal received here (SIGTERM if this rank stops because another rank got one)."""
    return _received[0] if _received else int(signal.SIGTERM)
