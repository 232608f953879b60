"""`stragglers.*`: the rank the others wait for, named while the job runs.

Under synchronous data parallelism every rank leaves each collective at the same moment, so
every rank's step takes as long as the slowest one's: step times are alike on every rank and do
not say which one is slow, and a slow rank and the ranks waiting for it are all off the CPU for
part of the step. What tells them apart is *why* a rank's thread is not running: a rank waiting
for a collective sleeps, while a rank starved of CPU (a CPU limit's quota spent, a noisy
neighbour, fewer cores than threads) is runnable and waits for a core. Linux counts both per
thread (`/proc/thread-self/schedstat`: time on a CPU, time runnable on a run queue), so each rank
reads its training thread's two counters once per window: its *demand* per step is the sum, the
time it ran or wanted to run. Every `stragglers.every_steps` steps the ranks exchange them (one
small all-reduce on the side group, read at the next step: no step waits for it), and a rank
whose demand is `stragglers.ratio` times the median of the others' in two comparisons running
is named with its host (`straggler: rank 1 (host b) ...`); `stragglers/ratio` and
`stragglers/rank` are logged at every comparison. The first window after the start is left
out (its first step imports and builds what later steps reuse, and rank 0 opens the run).
Two counter reads and one small collective per window: the cost, measured side by side while
nothing is slow, is in docs/hosts.md (`python benchmarks/stragglers.py`).

What it does not see: a rank slow on its accelerator (its thread sleeps in the GPU's
synchronisation like the others in theirs), and a frozen one (stopped, not runnable: the
collective timeout names it, `train.collective_timeout_s`). Off where the counters are missing
(not Linux) and on one rank.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtrain.config.schema import non_negative
from dtrain.errors import ConfigError
from dtrain.protocols import Feature, Run, StepOutput
from dtrain.runtime import distributed

SCHEDSTAT = Path("/proc/thread-self/schedstat")
RUNNING = 2  # comparisons in a row that name the same rank before it is said


@dataclass
class StragglersConfig:
    every_steps: int = 100
    """Compare the ranks every this many steps (on several ranks). 0: off."""
    ratio: float = 2.0
    """Name a rank whose demand for CPU time per step (running, or runnable and waiting for a
    core) is at least this many times the median of the other ranks', in two comparisons
    running (on a busy machine one comparison alone can reach 2 by chance)."""

    def validate(self) -> None:
        non_negative(self, "stragglers", "every_steps")
        if self.ratio <= 1:
            raise ConfigError("stragglers.ratio", self.ratio, "a ratio above 1 (1.5: half again the others' demand)")


def thread_times() -> tuple[int, int] | None:
    """(ns on a CPU, ns runnable but waiting for one) of the calling thread; None off Linux."""
    try:
        on_cpu, waiting = SCHEDSTAT.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return int(on_cpu), int(waiting)


class Stragglers(Feature):
    key, config_class, order = "stragglers", StragglersConfig, 95

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return bool(cfg.stragglers.every_steps)

    def __init__(self, run: Run):
        self.cfg: StragglersConfig = run.cfg.stragglers
        self.world = run.world_size
        self.mark: tuple[int, int] | None = None  # the counters at the window's start; None: off
        self.steps, self.windows = 0, 0
        self.answer = distributed.LaggedMax()
        self.named, self.streak = -1, (-1, 0)  # (rank, comparisons in a row it stood out)
        self.found: list[dict[str, Any]] = []

    def setup(self, run: Run) -> None:
        self.mark = thread_times() if self.world > 1 else None  # the steps' own, from here

    def after_step(self, run: Run, out: StepOutput) -> None:
        if self.mark is None:
            return
        answer = self.answer.read()  # asked at the previous step: long done
        if answer is not None:
            self._judge(run, answer)
        self.steps += 1
        if self.steps == self.cfg.every_steps:
            self.windows += 1
            now = thread_times() or self.mark
            if self.windows == 1:  # the first window: start-up's, not the steps'
                self.mark, self.steps = now, 0
                return
            # Microseconds per step, each rank in its own slots: a MAX over the ranks gathers them.
            values = [0] * (2 * self.world)
            values[distributed.rank()] = (now[0] - self.mark[0]) // (1000 * self.steps)
            values[self.world + distributed.rank()] = (now[1] - self.mark[1]) // (1000 * self.steps)
            self.answer.start(values)
            self.mark, self.steps = now, 0

    def _judge(self, run: Run, answer: list[int]) -> None:
        """Say which rank the others waited for, when its demand stands out."""
        on_cpu, waiting = answer[: self.world], answer[self.world :]
        demand = [c + w for c, w in zip(on_cpu, waiting)]
        slow = max(range(self.world), key=demand.__getitem__)
        others = statistics.median(d for r, d in enumerate(demand) if r != slow)
        ratio = demand[slow] / max(others, 1)
        run.log({"stragglers/ratio": ratio, "stragglers/rank": slow})
        if ratio < self.cfg.ratio:
            self.named, self.streak = -1, (-1, 0)
            return
        self.streak = (slow, self.streak[1] + 1 if self.streak[0] == slow else 1)
        if self.streak[1] >= RUNNING and slow != self.named:
            self.named = slow
            self.found.append({"rank": slow, "step": run.step, "ratio": round(ratio, 2)})
            run.say(
                f"straggler: rank {distributed.named([slow])} wants {ratio:.1f}x the CPU time per step of the "
                f"other ranks' median ({on_cpu[slow] / 1e3:.0f} ms running and {waiting[slow] / 1e3:.0f} ms waiting "
                f"for a core, vs {others / 1e3:.0f} ms; over the last {self.cfg.every_steps} steps): the others "
                "wait for it at every collective; if it stays so, drain its host or lift its CPU limit"
            )

    def summary(self, run: Run) -> dict[str, Any]:
        return {"stragglers": self.found} if self.found else {}
