"""The loop's parts, each deciding when it acts, so the loop itself reads on one screen:
`Checkpointer` (when to write, and publishing what was written in the background),
`Evaluator` (exact sharded evaluation, of the EMA too, and the search trial's reports),
`MetricsWindow` (per-rank sums between logs, reduced across ranks when logged),
`EarlyStopping` (the best evaluation so far, and when to give up)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sized, cast

import torch
from torch.utils.data import DataLoader

from dtrain import checkpoint, data, tracking
from dtrain.runtime import distributed
from dtrain.features import goodput
from dtrain.config import recipe
from dtrain.config import Config, EarlyStopConfig
from dtrain.errors import ConfigError
from dtrain.features.ema import EMA
from dtrain.engines import evaluation_weights
from dtrain.engines.optim import improvement
from dtrain.train.progress import Progress
from dtrain.protocols import Engine, StepOutput, Task
from dtrain.train.resume import TrainState
from dtrain.features.trial import Pruned, TrialReporter


class Checkpointer:
    """Knows where checkpoints live and when to write one (every N steps, or under `auto` at
    Young/Daly's interval from the measured checkpoint time); every rank calls it alike."""

    def __init__(self, cfg: Config, task: Task, engines: dict[str, Engine], state: TrainState, progress: Progress,
                 saved: dict[str, Any], ledger: goodput.Ledger, tracker: tracking.NullTracker):
        self.root = Path(cfg.output_dir) / "checkpoints"
        self.saved = saved
        """What a checkpoint holds beside the trainer's state: the engines (and the EMA)."""
        every = cfg.checkpoint.every_steps
        self.every, self.keep = every if isinstance(every, int) else 0, cfg.checkpoint.keep
        self.ledger, self.tracker = ledger, tracker
        self.auto: goodput.Interval | None = None
        if every == "auto":
            hours = cfg.checkpoint.mtbf_hours or goodput.NODE_MTBF_HOURS / distributed.read_env().num_nodes
            self.auto = goodput.Interval(hours * 3600.0, given=bool(cfg.checkpoint.mtbf_hours))
        self.last_step = state.step
        """The step of the last checkpoint this attempt wrote (its first step before one)."""
        self.background = cfg.checkpoint.async_
        self.task, self.engines, self.state, self.progress = task, engines, state, progress
        self.pending: checkpoint.Pending | None = None
        self.unfinished = distributed.LaggedAny()
        """Whether any rank's background write is still going, asked at one step, read at the next."""
        self.recipe = {k: str(v) for k, v in recipe.flatten(recipe.to_dict(cfg)).items()}
        """The recipe as strings (weights_only-loadable), for what a resume may not change."""
        self.last_state = ""
        """The trainer state the last checkpoint holds (its repr: nan equals nan)."""

    def due(self, total_steps: int) -> bool:
        step = self.state.step
        if step >= total_steps:
            return False
        if self.auto is not None:
            return step - self.last_step >= (self.auto.steps or goodput.FIRST_AFTER)
        return bool(self.every) and step % self.every == 0

    def retune(self, seconds: float, total_steps: int) -> None:
        """Under `auto`: a checkpoint blocked training `seconds`; set the interval from it.
        Collective: every rank takes rank 0's measurements, so all checkpoint at the same steps
        (intervals from each rank's own clock would differ, and the ranks hang apart)."""
        assert self.auto is not None
        seconds, step_time = distributed.broadcast_object((seconds, self.ledger.step_time()))
        if not seconds:  # nothing measured yet (a first attempt): the first checkpoint measures it
            return
        if self.auto.update(seconds, step_time, total_steps):
            self.progress.write(self.auto.describe(step_time, self.ledger.restart_estimate()))
        self.tracker.log_metrics({"checkpoint/every_steps": self.auto.steps, "checkpoint/delta_s": self.auto.delta_s,
                                  "checkpoint/tau_s": self.auto.tau()}, self.state.step)

    def save(self, wait: bool = False) -> float:
        """Write one checkpoint of the current state; returns the seconds training waited.
        Under `checkpoint.async` the files are written while training goes on, unless `wait`
        (the last checkpoint of a run, or one before stopping)."""
        t0 = time.perf_counter()
        self.last_step = self.state.step
        self.finish()  # the previous one is published (or its failure raised) before the next starts
        if self.last_state == repr(asdict(self.state)):  # nothing happened since (the best one's, at the end)
            return time.perf_counter() - t0
        self.last_state = repr(asdict(self.state))
        for engine in self.engines.values():
            engine.sync_buffers()  # what is saved is rank 0's; every rank continues from the same
        client = {"trainer": asdict(self.state), "rng": checkpoint.gather_rng_states(),
                  "task": self.task.extra_state(), "recipe": self.recipe}
        self.pending = checkpoint.save(self.root, self.state.step, self.saved, client, self.keep,
                                       background=self.background)
        if wait or not self.background:
            self.finish()
        return time.perf_counter() - t0

    def poll(self) -> None:
        """After each step: publish a checkpoint written in the background soon after every
        rank's writes have ended, so `latest` moves promptly and a failed write is reported
        within steps. The ranks agree without waiting: asked after one step, answered after
        the next (`LaggedAny`)."""
        if self.pending is None:
            return
        unfinished = self.unfinished.read()
        if unfinished is False:
            self.finish()
        else:
            self.unfinished.start(not self.pending.written())

    def finish(self) -> None:
        """Publish the checkpoint being written, once every rank's files are on disk."""
        pending, self.pending = self.pending, None
        self.unfinished.drain()  # a question about this checkpoint must not answer for the next
        if pending is not None:
            pending.finish()
            self.ledger.written(time.perf_counter() - pending.started)

    def settle(self, wait_s: float) -> None:
        """On the way out after an error: a checkpoint still being written is finished and
        published when every rank's part reached the disk, else removed; either is said.
        No collectives: the other ranks may have stopped anywhere."""
        pending, self.pending = self.pending, None
        if pending is not None:
            said = pending.settle(wait_s)
            if said:
                self.progress.write(said)


class Evaluator:
    """Exact sharded evaluation, every `train.eval_every_steps` or at each epoch's end."""

    def __init__(self, cfg: Config, task: Task, engines: dict[str, Engine], loader: DataLoader[Any], device: torch.device,
                 tracker: tracking.NullTracker, progress: Progress, ema: EMA | None):
        self.every = cfg.train.eval_every_steps
        self.task, self.engines, self.loader, self.device = task, engines, loader, device
        self.tracker, self.progress = tracker, progress
        self.last: dict[str, float] = {}
        self.last_ema: dict[str, float] = {}
        self.ema = ema
        self.last_step = -1
        # A search trial reports each evaluation to its study, which may stop it.
        self.trial = TrialReporter(cfg.trial) if cfg.trial.storage else None
        self.pruned: Pruned | None = None

    def due_after_step(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def due_at_epoch_end(self, step: int, total_steps: int) -> bool:
        return not self.every and step < total_steps  # the final evaluation follows the last step anyway

    def run(self, state: TrainState) -> float:
        """Evaluate, log and print; returns the seconds it took (not training time)."""
        t0 = time.perf_counter()
        for engine in self.engines.values():
            engine.sync_buffers()  # the metric is of exactly the weights and buffers model.pt holds
        with evaluation_weights(self.engines):
            self.last = self.task.evaluate(self.engines, self.loader, self.device)
        self.last_step = state.step
        self.tracker.log_metrics({f"eval/{k}": v for k, v in self.last.items()}
                                 | {"train/samples_seen": state.samples_seen}, state.step)
        self.progress.write(f"eval @ step {state.step}: " + " ".join(f"{k} {_fmt(v)}" for k, v in self.last.items()))
        if self.ema is not None:
            with self.ema.swapped():
                for engine in self.engines.values():
                    engine.sync_buffers()  # the averaged BatchNorm statistics: rank 0's, as model.pt holds
                self.last_ema = self.task.evaluate(self.engines, self.loader, self.device)
            self.tracker.log_metrics({f"eval_ema/{k}": v for k, v in self.last_ema.items()}, state.step)
            self.progress.write(f"eval_ema @ step {state.step}: "
                                + " ".join(f"{k} {_fmt(v)}" for k, v in self.last_ema.items()))
        for name, engine in self.engines.items():  # optim.schedule=plateau: drop the LR on a plateau
            if engine.scheduler.observe(self.last):
                self.progress.write(f"plateau: {'' if name == 'model' else name + ' '}lr scale "
                                    f"{engine.scheduler.plateau['scale']:.4g} after step {state.step}")
        if self.trial is not None:
            self.pruned = self.trial.report(self.last, state.step)
        return time.perf_counter() - t0


KEEP_BEST = "checkpoint.keep_best (the task's headline_metric())"


def check_metric_keys(cfg: Config, task: Task, engines: dict[str, Engine], eval_loader: DataLoader[Any],
                      device: torch.device) -> None:
    """Keys that name an eval metric (`early_stop.metric`, `optim.plateau_metric`, a trial's
    metric) are checked before the first step, against what the task reports for one
    evaluation batch per rank: a typo costs seconds, not a training run. Collective."""
    from torch.utils.data import Subset

    wanted = {key: metric for key, metric, on in (
        ("early_stop.metric", cfg.early_stop.metric, bool(cfg.early_stop.metric)),
        ("optim.plateau_metric", cfg.optim.plateau_metric, cfg.optim.schedule == "plateau"),
        ("trial.metric", cfg.trial.metric, bool(cfg.trial.storage)),
        (KEEP_BEST, task.headline_metric()[0], cfg.checkpoint.keep_best and not cfg.early_stop.metric)) if on}
    if not wanted:
        return
    ds, batch = eval_loader.dataset, eval_loader.batch_size or 1
    n = min(len(cast(Sized, ds)), batch * distributed.world_size())
    probe = data.eval_loader(Subset(ds, range(n)), batch, distributed.world_size(), distributed.rank(), 0)
    rng = checkpoint.rng_state()  # an evaluation may draw random numbers: training's streams stay as they were
    try:
        with evaluation_weights(engines):
            names = sorted(task.evaluate(engines, probe, device))
    finally:
        checkpoint.set_rng_state(rng)
    for key, metric in wanted.items():
        if metric not in names:
            raise ConfigError(key, metric, f"not an eval metric of this task; it reports {', '.join(names) or 'none'}")


class EarlyStopping:
    """`early_stop.*`: tracks the watched metric's best value in the `TrainState` (so it
    resumes), says when an evaluation improved on it and when patience has run out. With
    `stops` off it only watches (`checkpoint.keep_best`)."""

    def __init__(self, cfg: EarlyStopConfig, state: TrainState, stops: bool = True):
        self.cfg, self.state, self.stops = cfg, state, stops
        self.best_eval: dict[str, float] = {}

    @classmethod
    def of(cls, cfg: Config, task: Task, state: TrainState) -> EarlyStopping | None:
        """`early_stop.metric`'s watch; else, under `checkpoint.keep_best`, one on the task's
        headline metric that never stops training and leaves model.pt the last weights."""
        if cfg.early_stop.metric:
            return cls(cfg.early_stop, state)
        if not cfg.checkpoint.keep_best:
            return None
        name, higher = task.headline_metric()
        return cls(EarlyStopConfig(metric=name, mode="max" if higher else "min", restore_best=False), state,
                   stops=False)

    def improved(self, metrics: dict[str, float], step: int) -> bool:
        """Record one evaluation; True when it is the best so far (by more than min_delta)."""
        c, s = self.cfg, self.state
        key = "early_stop.metric" if self.stops else KEEP_BEST
        value, improved = improvement(metrics, key, c.metric, s.best_value, c.mode, c.min_delta)
        if improved:
            s.best_value, s.best_step, s.evals_since_best = value, step, 0
            self.best_eval = dict(metrics)
            return True
        s.evals_since_best += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.stops and self.state.evals_since_best >= self.cfg.patience


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) >= 1 else f"{v:.4f}"


class MetricsWindow:
    """Per-rank sums of the step outputs since the last log; reduced across ranks when logged."""

    def __init__(self, log_every: int):
        self.log_every = log_every
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = self.samples = 0
        self.t0 = time.perf_counter()

    def add(self, out: StepOutput, samples: int) -> None:
        for k, v in {"loss": out.loss, **out.metrics}.items():
            v = v.detach().double()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1
        self.samples += samples

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.log_every == 0 or step == total_steps

    def pause(self, seconds: float) -> None:
        """Time spent on evaluation or checkpoints is not training time."""
        self.t0 += seconds

    def reduce(self) -> tuple[dict[str, float], float, float]:
        """(ranks' mean of each windowed value, samples/s, seconds); one all-reduce for all."""
        keys = sorted(self.sums)
        means = (distributed.all_reduce_mean(torch.stack([self.sums[k] for k in keys])) / self.steps).tolist()
        seconds = time.perf_counter() - self.t0
        return dict(zip(keys, means)), self.samples / max(seconds, 1e-9), seconds
