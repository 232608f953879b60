"""Goodput: where a run's wall time went, over all its attempts, and the checkpoint interval
that loses the least of it to failures.

A run that fails and restarts (torchrun `--max-restarts`, a Kubernetes restart, a SLURM
requeue, all with `resume=auto`) spends its wall time on:

- productive steps: training steps whose result was kept;
- startup / restarts: process start -> process group up -> checkpoint loaded -> first step
  done, for the first attempt and for each one after a failure;
- lost work: steps an attempt did after its last checkpoint, done again by the next;
- downtime: from a failed attempt's last record to the next attempt's process start
  (noticing the failure, tearing down, relaunching; and the failed attempt's unrecorded
  last steps, at most a log interval or `BEAT_S`);
- checkpoints: the time training waited for them (with `checkpoint.async`, the copy to memory);
- evaluation;
- other: the rest (logging, writing outputs), so the parts add up to the wall time.

goodput = productive step time / wall time. Rank 0 keeps the ledger in
`output_dir/goodput.json` (written atomically with the logged metrics and at each checkpoint),
so the attempt after a SIGKILL finds what the killed one did: a run resumed in its own
output_dir continues the ledger, in its own MLflow run.

`checkpoint.every_steps: auto` sets the interval by Young (1974) and Daly (2006): with δ the
seconds a checkpoint blocks training and M the job's mean time between failures, checkpoints
every τ = sqrt(2 δ M) seconds lose the least; the expected fraction lost is about
δ/τ + (τ/2 + R)/M, with R the restart time. δ is measured at the first checkpoint (written
after `FIRST_AFTER` steps) and re-estimated at each one after.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from dtrain.protocols import Clock, Feature, Run, StepOutput
from dtrain.runtime import distributed
from dtrain.runtime.files import atomic_write

BEAT_S = 1.0
"""The ledger is written at least this often while steps run (rank 0: a few hundred bytes,
~0.1 ms without fsync)."""
FIRST_AFTER = 5
"""Under `auto`, the first checkpoint (which measures δ) follows this many steps of an attempt."""
NODE_MTBF_HOURS = 6000.0
"""The per-node mean time between failures `auto` assumes when `checkpoint.mtbf_hours` is 0:
Llama 3 405B's pre-training saw 419 unexpected interruptions in 54 days on 2,048 8-GPU nodes,
one per node every ~6,300 hours."""
FILE = "goodput.json"


def process_start() -> float:
    """This process's start (Unix time): from /proc on Linux, so the interpreter's and torch's
    import time count as startup; else the time of this call."""
    try:
        fields_ = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + int(fields_[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return time.time()


_process_counted = False


@dataclass
class Attempt:
    """One process lifetime of the run (on rank 0). Times in seconds; `started`, `seen` Unix."""

    started: float
    first_step: int = 0
    """The step it resumed at (0 for a fresh start)."""
    to_group_s: float = 0.0
    to_loaded_s: float = 0.0
    to_first_step_s: float = 0.0
    """Process start -> process group up -> checkpoint loaded -> first step done: its startup."""
    step_s: float = 0.0
    """Step time after its first step, evaluation and checkpoints excluded."""
    steps: int = 0
    """Steps in `step_s`."""
    eval_s: float = 0.0
    checkpoint_s: float = 0.0
    """Time training waited for checkpoints."""
    checkpoint_write_s: float = 0.0
    """Checkpoints' full write time (with `checkpoint.async`, mostly behind training)."""
    checkpoints: int = 0
    reached: int = 0
    """The last step it recorded."""
    seen: float = 0.0
    """When it last recorded (Unix)."""
    lost_steps: int = 0
    """Its steps after its last checkpoint, done again by the next attempt."""
    lost_s: float = 0.0
    downtime_s: float = 0.0
    """From its last record to the next attempt's process start."""
    ended: str = ""
    """How it ended, when it could say: finished, stopped, preempted, pruned (empty: killed or failed)."""

    @property
    def startup_s(self) -> float:
        return self.to_first_step_s

    @property
    def step_time(self) -> float:
        return self.step_s / self.steps if self.steps else 0.0


@dataclass
class Totals:
    """The run's wall time split into parts that add up to it."""

    wall_s: float
    productive_s: float
    startup_s: float
    """The first attempt's."""
    restart_s: float
    """The later attempts' startups."""
    lost_s: float
    downtime_s: float
    checkpoint_s: float
    eval_s: float
    other_s: float
    checkpoint_write_s: float
    attempts: int
    lost_steps: int
    goodput: float

    def line(self) -> str:
        failures = self.restart_s + self.lost_s + self.downtime_s
        return (
            f"goodput {self.goodput:.1%} over {self.attempts} attempt{'s' * (self.attempts > 1)}: "
            f"{self.productive_s:.1f}s of {self.wall_s:.1f}s wall in productive steps; "
            f"failures {failures:.1f}s (restarts {self.restart_s:.1f}s, {self.lost_steps} steps redone "
            f"{self.lost_s:.1f}s, downtime {self.downtime_s:.1f}s), startup {self.startup_s:.1f}s, "
            f"checkpoints {self.checkpoint_s:.1f}s, evaluation {self.eval_s:.1f}s, other {self.other_s:.1f}s"
        )


class Ledger:
    """Rank 0's account of the run's attempts; every rank keeps one (cheap) but only rank 0 writes."""

    def __init__(self, path: Path, writes: bool, began: float):
        """`began`: when this attempt's `fit` began (Unix), the process group up."""
        global _process_counted
        self.path, self.writes = path, writes
        self.attempts: list[Attempt] = []
        # A process's start counts once: a second run in one process (a search's in-process
        # trial, a test) starts when its `fit` began.
        self.now = Attempt(started=began if _process_counted else process_start())
        _process_counted = True
        self.began = began
        self._lap = 0.0
        self._charged = 0.0
        self._written = 0.0

    def open(self, continues: bool, step: int, loaded: float) -> None:
        """Start this attempt at `step`, resumed by `loaded` (Unix); with `continues`, after the
        attempts the ledger file holds: the last one's steps past `step` are lost work, and the
        time from its last record to this process's start downtime."""
        self.now.first_step = self.now.reached = step
        self.now.to_group_s = self.began - self.now.started
        self.now.to_loaded_s = loaded - self.now.started
        if continues and self.path.exists():
            try:
                known = {f.name for f in fields(Attempt)}
                self.attempts = [
                    Attempt(**{k: v for k, v in a.items() if k in known})
                    for a in json.loads(self.path.read_text())["attempts"]
                ]
            except (OSError, ValueError, KeyError, TypeError):
                self.attempts = []  # unreadable: this attempt starts a new account
        if self.attempts:
            last = self.attempts[-1]
            last.lost_steps = max(0, last.reached - step)
            last.lost_s = min(last.lost_steps * last.step_time, last.step_s)
            last.downtime_s = max(0.0, self.now.started - last.seen)
        self._lap = time.perf_counter()

    def stepped(self, step: int, logged: bool) -> None:
        """A step ended: the time since the last one, less what was charged meanwhile, is step
        time (this attempt's first step: the end of its startup). The ledger is written with
        the step's metrics (`logged`) and at least every `BEAT_S`, so a killed attempt's last
        record is at most a log interval old."""
        now = time.perf_counter()
        if self.now.to_first_step_s == 0.0:  # (a checkpoint or evaluation after it is charged as such)
            self.now.to_first_step_s = time.time() - self.now.started - self._charged
        else:
            self.now.step_s += now - self._lap - self._charged
            self.now.steps += 1
        self._lap, self._charged = now, 0.0
        self.now.reached = step
        if self.writes and (logged or now - self._written >= BEAT_S):
            self.write()

    def charge(self, part: str, seconds: float, count: int = 1) -> None:
        """Seconds spent between steps on `eval` or `count` checkpoints (not step time)."""
        self._charged += seconds
        if part == "eval":
            self.now.eval_s += seconds
        else:
            self.now.checkpoint_s += seconds
            self.now.checkpoints += count

    def written(self, seconds: float) -> None:
        """A checkpoint's files are all on disk, `seconds` after it began."""
        self.now.checkpoint_write_s += seconds

    def write(self) -> Totals:
        """The ledger as of now, to `goodput.json` (rank 0); returns the totals written."""
        self._written = time.perf_counter()
        totals = self.totals()
        if not self.writes:
            return totals
        self.now.seen = time.time()
        text = json.dumps({"attempts": self.records(), "totals": asdict(totals)}, indent=1) + "\n"
        try:
            atomic_write(self.path, lambda tmp: tmp.write_text(text))
        except OSError:
            pass  # an account, not the run's state: a full disk is reported by the checkpoint itself
        return totals

    def records(self) -> list[dict[str, Any]]:
        return [asdict(a) for a in [*self.attempts, self.now]]

    def end(self, how: str) -> Totals:
        self.now.ended = how
        return self.write()

    def totals(self) -> Totals:
        everyone = [*self.attempts, self.now]
        wall = time.time() - everyone[0].started
        steps = sum(a.step_s for a in everyone)
        lost = sum(a.lost_s for a in self.attempts)
        parts = dict(
            productive_s=steps - lost,
            startup_s=everyone[0].startup_s,
            restart_s=sum(a.startup_s for a in everyone[1:]),
            lost_s=lost,
            downtime_s=sum(a.downtime_s for a in self.attempts),
            checkpoint_s=sum(a.checkpoint_s for a in everyone),
            eval_s=sum(a.eval_s for a in everyone),
        )
        return Totals(
            wall_s=wall,
            **parts,
            other_s=wall - sum(parts.values()),
            checkpoint_write_s=sum(a.checkpoint_write_s for a in everyone),
            attempts=len(everyone),
            lost_steps=sum(a.lost_steps for a in self.attempts),
            goodput=parts["productive_s"] / wall if wall > 0 else 0.0,
        )

    def step_time(self) -> float:
        """Seconds per step: this attempt's so far, else the earlier attempts'."""
        done = [a for a in (self.now, *reversed(self.attempts)) if a.steps]
        return done[0].step_time if done else 0.0

    def delta_estimate(self) -> float:
        """Seconds a checkpoint blocked training in the earlier attempts (0: none written)."""
        n = sum(a.checkpoints for a in self.attempts)
        return sum(a.checkpoint_s for a in self.attempts) / n if n else 0.0

    def restart_estimate(self) -> float:
        """R for the model: the mean restart so far, else the first attempt's startup."""
        later = [a.startup_s for a in [*self.attempts, self.now][1:] if a.startup_s]
        return sum(later) / len(later) if later else self.attempts[0].startup_s if self.attempts else self.now.startup_s


def metrics(totals: Totals) -> dict[str, float]:
    """The totals as MLflow metrics, `goodput/...`."""
    return {f"goodput/{k}": float(v) for k, v in asdict(totals).items()}


@dataclass
class Interval:
    """`checkpoint.every_steps: auto`: Young/Daly's interval from the measured δ and step time."""

    mtbf_s: float
    given: bool = True
    """False: `mtbf_s` is the default (NODE_MTBF_HOURS per node), which `describe` says."""
    delta_s: float = 0.0
    """δ, smoothed over the checkpoints measured so far (0: none yet)."""
    steps: int = 0
    """The interval in steps (0: not set yet; the first checkpoint comes after FIRST_AFTER steps)."""

    def tau(self) -> float:
        return math.sqrt(2.0 * self.delta_s * self.mtbf_s)

    def expected_loss(self, restart_s: float) -> float:
        """The fraction of wall time expected to go to checkpoints and failures at this τ."""
        tau = self.tau()
        return min(1.0, self.delta_s / tau + (tau / 2.0 + restart_s) / self.mtbf_s) if tau > 0 else 1.0

    def update(self, delta_s: float, step_time_s: float, max_steps: int) -> bool:
        """A checkpoint blocked training `delta_s` seconds; steps take `step_time_s`: set the
        interval. Returns True when it changed by more than a quarter (worth saying)."""
        self.delta_s = delta_s if not self.delta_s else 0.5 * self.delta_s + 0.5 * delta_s
        steps = max(1, min(max_steps, round(self.tau() / step_time_s))) if step_time_s > 0 else max(1, self.steps)
        changed = not self.steps or abs(steps - self.steps) > 0.25 * self.steps
        self.steps = steps
        return changed

    def describe(self, step_time_s: float, restart_s: float) -> str:
        mtbf = f"{self.mtbf_s / 3600:g} h" + (
            "" if self.given else f" (checkpoint.mtbf_hours unset: {NODE_MTBF_HOURS:g} h per node / nodes)"
        )
        return (
            f"checkpoint.every_steps=auto: every {self.steps} steps ({self.steps * step_time_s:.1f}s; "
            f"Young/Daly tau = sqrt(2 x {self.delta_s:.2f}s checkpoint x {mtbf} MTBF) = {self.tau():.1f}s); "
            f"expected loss to checkpoints and failures {self.expected_loss(restart_s):.1%}"
        )


class Goodput(Feature):
    """Every run's account of its wall time (`goodput.json`, `goodput/*` in MLflow, the closing
    line), and `checkpoint.every_steps: auto`: it asks for a checkpoint at Young/Daly's interval."""

    order = 10
    matrix = {"every_steps_auto": ("checkpoint.every_steps=auto", "checkpoint.mtbf_hours=0.0001")}

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return True

    def __init__(self, run: Run):
        self.ledger = Ledger(run.output_dir / FILE, distributed.is_main(), run.clock.began)
        self.auto: Interval | None = None
        c = run.cfg.checkpoint
        if c.every_steps == "auto":
            hours = c.mtbf_hours or NODE_MTBF_HOURS / distributed.read_env().num_nodes
            self.auto = Interval(hours * 3600.0, given=bool(c.mtbf_hours))
        self.seen = Clock()
        """The loop's clock when this feature last looked: what changed since is charged."""
        self.totals: Totals | None = None

    def setup(self, run: Run) -> None:
        self.ledger.open(continues=bool(run.cfg.resume), step=run.step, loaded=run.clock.loaded)
        self.seen = Clock(**vars(run.clock))
        if self.auto is not None:  # from the δ the earlier attempts measured, if any
            self._retune(run, self.ledger.delta_estimate())

    def after_step(self, run: Run, out: StepOutput) -> None:
        written = self._charge(run)
        self.ledger.stepped(run.step, logged=False)
        if written:
            if self.auto is not None:
                self._retune(run, run.clock.last_checkpoint_s)
            run.log(metrics(self.ledger.write()))
        if (
            self.auto is not None
            and run.step < run.total_steps
            and run.step - run.clock.last_checkpoint_step >= (self.auto.steps or FIRST_AFTER)
        ):
            run.request_checkpoint()

    def end(self, run: Run, status: str) -> None:
        self._charge(run)
        if status == "failed":
            self.ledger.write()  # how far this attempt got, for the next one's account
            return
        self.totals = self.ledger.end(status)
        run.log(metrics(self.totals))
        run.say(self.totals.line())

    def summary(self, run: Run) -> dict[str, Any]:
        if self.totals is None:
            return {}
        return {"goodput": {**asdict(self.totals), "by_attempt": self.ledger.records()}}

    def _charge(self, run: Run) -> bool:
        """Eval and checkpoint time since the last look; True when a checkpoint was written."""
        now, was = run.clock, self.seen
        if now.eval_s > was.eval_s:
            self.ledger.charge("eval", now.eval_s - was.eval_s)
        written = now.checkpoints > was.checkpoints
        if written:
            self.ledger.charge("checkpoint", now.checkpoint_s - was.checkpoint_s, now.checkpoints - was.checkpoints)
        if now.checkpoint_write_s > was.checkpoint_write_s:
            self.ledger.written(now.checkpoint_write_s - was.checkpoint_write_s)
        self.seen = Clock(**vars(now))
        return written

    def _retune(self, run: Run, seconds: float) -> None:
        """Under `auto`: a checkpoint blocked training `seconds`; set the interval from it.
        Collective: every rank takes rank 0's measurements, so all checkpoint at the same steps
        (intervals from each rank's own clock would differ, and the ranks hang apart)."""
        assert self.auto is not None
        seconds, step_time = distributed.broadcast_object((seconds, self.ledger.step_time()))
        if not seconds:  # nothing measured yet (a first attempt): the first checkpoint measures it
            return
        if self.auto.update(seconds, step_time, run.total_steps):
            run.say(self.auto.describe(step_time, self.ledger.restart_estimate()))
        run.log(
            {
                "checkpoint/every_steps": self.auto.steps,
                "checkpoint/delta_s": self.auto.delta_s,
                "checkpoint/tau_s": self.auto.tau(),
            }
        )
