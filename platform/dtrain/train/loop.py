"""The training loop: steps, logging, evaluation, checkpoints, and the features' hooks.

`Loop.run` is the loop `dtrain.protocols.Feature` draws in pseudocode: each step is the
task's `train_step` (for supervised tasks `dtrain.tasks.supervised.train_step`, where the
features' loss terms come in), then every feature's `after_step`; an evaluation, when due,
then every feature's `after_eval`; a checkpoint when due or asked for. No feature is named
here: what a feature does, it does through its hooks and the `Run` this loop is to it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch.utils.data import DataLoader

from dtrain import checkpoint, data
from dtrain.config import Config
from dtrain.errors import ConfigError, TrainingError
from dtrain.protocols import BaseTask, Checkpointed, Clock, Engine, Feature, StepOutput, Tracker
from dtrain.runtime import distributed, preemption, timing
from dtrain.tracking import NullTracker
from dtrain.train import report
from dtrain.train.checkpointer import Checkpointer
from dtrain.train.evaluator import Evaluator, metrics_line
from dtrain.train.metrics import MetricsWindow
from dtrain.train.progress import Progress
from dtrain.train.state import TrainState


@dataclass
class Parts:
    """Everything a recipe names, built alike on every rank (`dtrain.train.fit.build`)."""

    task: BaseTask
    plan: data.BatchPlan
    loader: DataLoader[Any]
    eval_loader: DataLoader[Any]
    micro: int
    """Loader batches per training step."""
    per_epoch: int
    """Training steps per epoch."""
    total_steps: int
    engines: dict[str, Engine]
    fp32_matmuls: str | None
    """tf32 or ieee on CUDA (`allow_tf32`), None elsewhere."""
    parameters: int
    """The models' parameters, counted before any engine shards them."""


@dataclass(frozen=True)
class Outcome:
    """How training ended. Only "finished" wrote model.pt and summary.json (`summary`, on rank
    0); "stopped" (`train.stop_at_step`) and "preempted" (by signal `signum`) checkpointed for
    the next attempt; "halted": a feature ended it without finishing (a search trial its study
    stopped), saying why in `reason`."""

    status: Literal["finished", "stopped", "preempted", "halted"]
    step: int
    summary: dict[str, Any] = field(default_factory=dict)
    signum: int = 0
    reason: str = ""


class Terms:
    """The features' loss terms, composed in hook order (`dtrain.protocols.LossTerms`)."""

    def __init__(self, features: list[Feature]):
        self.features = features
        self.needs_outputs = any(f.needs_outputs for f in features)

    def __call__(
        self, loss: torch.Tensor, outputs: torch.Tensor | None, batch: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logged: dict[str, torch.Tensor] = {}
        for feature in self.features:
            loss, more = feature.loss(loss, outputs, batch)
            logged |= more
        return loss, logged


class Loop:
    """The training loop and its parts; to the features, the `Run` they are part of."""

    def __init__(self, cfg: Config, parts: Parts, device: torch.device, state: TrainState, clock: Clock):
        self.cfg, self.task, self.engines, self.device = cfg, parts.task, parts.engines, device
        self.train_loader, self.eval_loader = parts.loader, parts.eval_loader
        self.plan, self.micro, self.per_epoch, self.total_steps = (
            parts.plan,
            parts.micro,
            parts.per_epoch,
            parts.total_steps,
        )
        self.global_batch, self.world_size = parts.plan.global_batch, parts.plan.world_size
        self.output_dir, self.parameters, self.state, self.clock = Path(cfg.output_dir), parts.parameters, state, clock
        self.fp32_matmuls = parts.fp32_matmuls
        self.features: list[Feature] = []
        self.tracker: Tracker = NullTracker()
        self.progress = Progress(self.total_steps, distributed.is_main())
        self.evaluator = Evaluator(cfg, self.task, self.engines, self.eval_loader, device)
        self.window = MetricsWindow(cfg.tracking.log_every)
        self.samples_per_step = self.plan.per_rank * self.plan.world_size * self.micro
        self.bad_steps = 0
        self.final_loss = float("nan")
        self.first_step_s = 0.0
        """Wall time of this invocation's first step: with `compile`, mostly compiling."""
        self.preempted_by = 0
        """The stop signal every rank agreed on (checkpointed at that step), or 0."""
        self.stopping: tuple[str, bool] | None = None
        """(why, halt) once a feature asked to stop."""
        self.asked: str = ""
        """A checkpoint a feature asked for: "plain" or "best"."""
        self.held: tuple[list[str], list[dict[str, float]]] | None = ([], [])
        """Lines and metrics of the features' setup, held until the start line is out."""
        self.resumed = False
        self.settled_from = 0
        self.slow = False
        """This step also evaluated or checkpointed (on every rank alike)."""

    def add_features(self, features: list[type[Feature]]) -> None:
        """Build the recipe's features (before resume: what it loads must exist), and the
        checkpointer that saves them with the engines."""
        self.features = [cls(self) for cls in features]
        losses = [f for f in self.features if type(f).loss is not Feature.loss]
        self.terms = Terms(losses) if losses else None
        self.parts: dict[str, Checkpointed] = {**self.engines, **{_name(f): f for f in self.features if f.folder_state}}
        self.checkpointer = Checkpointer(
            self.cfg,
            self.task,
            self.state,
            self.engines,
            self.parts,
            lambda: {_name(f): f.state_dict() for f in self.features},
            self.clock,
        )

    def load_feature_states(self, saved: dict[str, Any]) -> None:
        self.resumed = True
        for f in self.features:
            if _name(f) in saved:
                f.load_state_dict(saved[_name(f)])

    def setup(self) -> None:
        """After resume: each feature's setup (the plateau schedule's metric checked here too)."""
        self.clock.last_checkpoint_step = self.state.step
        self.steady_from = self.state.step + min(5, max(0, self.total_steps - self.state.step - 1))
        self.steady_t, self.steady_samples = 0.0, 0
        if self.cfg.optim.schedule == "plateau" and self.cfg.optim.plateau_metric not in self.metric_names():
            raise ConfigError(
                "optim.plateau_metric",
                self.cfg.optim.plateau_metric,
                f"not an eval metric of this task; it reports {', '.join(self.metric_names()) or 'none'}",
            )
        for f in self.features:
            f.setup(self)

    def begin(self, tracker: Tracker, start_line: str) -> None:
        """The run is tracked: say the start line, then what the features' setup held back."""
        self.tracker = tracker
        held, self.held = self.held, None
        self.progress.write(start_line)
        for f in self.features:
            if f.describe():
                self.progress.write(f.describe())
        assert held is not None
        for line in held[0]:
            self.progress.write(line)
        for metrics in held[1]:
            tracker.log_metrics(metrics, self.state.step)

    # ------------------------------------------------------------------ the Run a feature sees

    @property
    def step(self) -> int:
        return self.state.step

    def say(self, line: str) -> None:
        if self.held is not None:
            self.held[0].append(line)
        else:
            self.progress.write(line)

    def log(self, metrics: dict[str, float]) -> None:
        if self.held is not None:
            self.held[1].append(metrics)
        else:
            self.tracker.log_metrics(metrics, self.state.step)

    def log_file(self, path: Path, folder: str = "") -> None:
        self.tracker.log_artifact(path, folder or None)

    def evaluate(self) -> dict[str, float]:
        return self.evaluator.evaluate()

    def report_eval(self, prefix: str, metrics: dict[str, float]) -> None:
        seen = {"train/samples_seen": self.state.samples_seen} if prefix == "eval" else {}
        self.log({f"{prefix}/{k}": v for k, v in metrics.items()} | seen)
        self.say(f"{prefix} @ step {self.state.step}: {metrics_line(metrics)}")

    def metric_names(self) -> list[str]:
        return self.evaluator.metric_names()

    def request_checkpoint(self, best: bool = False) -> None:
        self.asked = "best" if best or self.asked == "best" else "plain"

    def checkpoint_folder(self, step: int) -> Path:
        return self.checkpointer.folder(step)

    def load_weights(self, folder: Path) -> bool:
        if not distributed.agree((folder / checkpoint.TRAINER).exists()):
            return False
        checkpoint.load(folder, self.parts)  # collective
        return True

    def stop(self, reason: str, halt: bool = False) -> None:
        self.stopping = (reason, halt)
        self.say(reason)

    # ------------------------------------------------------------------ the loop

    def done(self) -> bool:
        return (
            self.state.step >= self.total_steps
            or 0 < self.cfg.train.stop_at_step <= self.state.step
            or self.preempted_by > 0
            or self.stopping is not None
        )

    def run(self) -> Outcome:
        """Train until the run is done or stops; the features' `end`; how it ended."""
        self._train()
        preemption.settle()
        outcome = self._end()
        for f in self.features:
            f.end(self, outcome.status)
        if outcome.status == "finished":
            outcome.summary.update(self._summary())
        return outcome

    def _end(self) -> Outcome:
        """After the last step: the final evaluation and checkpoint, and how the run ended."""
        state = self.state
        if self.preempted_by:
            return Outcome("preempted", state.step, signum=self.preempted_by)
        if self.stopping is not None and self.stopping[1]:
            return Outcome("halted", state.step, reason=self.stopping[0])
        if state.step < self.total_steps and self.stopping is None:  # train.stop_at_step
            self._checkpoint(wait=True)
            return Outcome("stopped", state.step)
        if self.evaluator.last_step != state.step:
            self._evaluate()
        self._checkpoint(wait=True)
        return Outcome("finished", state.step)

    def _train(self) -> None:
        """Steps until the run is done or stops (preemption); evaluation at epoch ends."""
        state = self.state
        while not self.done():
            for batches in self._epoch():
                t0 = time.perf_counter()
                with preemption.step():
                    out = self.task.train_step(self.engines, batches, self.terms)
                self._after_step(out)
                self.first_step_s = self.first_step_s or time.perf_counter() - t0
                # Collective: every rank stops after the same step (asking at once after a slow one).
                slow, self.slow = self.slow, False
                if not self.done() and preemption.requested(state.step, slow):
                    seconds = self._checkpoint(wait=True)
                    self.preempted_by = preemption.signal_number()
                    self.say(
                        f"preempted by signal {self.preempted_by} at step {state.step}: checkpoint written in "
                        f"{seconds:.2f}s to {self.checkpointer.root}; resume=auto continues from step {state.step}"
                    )
                if self.done():
                    break
            if state.batch_in_epoch == self.per_epoch * self.micro:  # the epoch ran out
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                if self.evaluator.due_at_epoch_end(state.step, self.total_steps):
                    self._evaluate()

    def _epoch(self) -> Iterator[list[Any]]:
        """This epoch's remaining steps, each a list of `micro` loader batches."""
        state = self.state
        data.set_position(self.train_loader, state.epoch, state.batch_in_epoch * self.plan.per_rank)
        batches = data.start(self.train_loader)
        for _ in range(state.batch_in_epoch // self.micro, self.per_epoch):
            with timing.region("data"):
                step_batches = [data.move(next(batches), self.device) for _ in range(self.micro)]
            yield step_batches

    def _after_step(self, out: StepOutput) -> None:
        state = self.state
        state.step += 1
        state.batch_in_epoch += self.micro
        state.samples_seen += self.samples_per_step
        for f in self.features:
            f.after_step(self, out)
        self.window.add(out, self.samples_per_step)
        if math.isnan(state.initial_loss):
            state.initial_loss = float(distributed.all_reduce_mean(out.loss.detach().clone().double()))
        self.bad_steps = 0 if out.stepped else self.bad_steps + 1
        if self.bad_steps >= self.cfg.train.max_nonfinite_steps:
            raise TrainingError(
                f"gradient norm non-finite for {self.bad_steps} consecutive steps at step "
                f"{state.step} (lower optim.lr, set optim.clip_grad_norm, or use precision=bf16)"
            )
        if state.step == self.steady_from:  # (before a log resets the window)
            self.steady_t = state.train_time_s + (time.perf_counter() - self.window.t0)
            self.steady_samples = state.samples_seen
        if self.window.due(state.step, self.total_steps):
            self._log(out)
        if self.evaluator.due_after_step(state.step):
            self._evaluate()
        self.checkpointer.poll()
        if self.asked or self.checkpointer.due(self.total_steps):
            self._checkpoint()

    def _evaluate(self) -> None:
        """Evaluate and say it; then the features' `after_eval` (a checkpoint one asks for is written)."""
        t0 = time.perf_counter()
        metrics, lines = self.evaluator.run(self.state.step)
        self.report_eval("eval", metrics)
        for line in lines:
            self.say(line)
        for f in self.features:
            f.after_eval(self, metrics)
        seconds = time.perf_counter() - t0
        self.window.pause(seconds)
        self.clock.eval_s += seconds
        self.slow = True
        if self.asked == "best":
            self._checkpoint(wait=True)

    def _checkpoint(self, wait: bool = False) -> float:
        """Write one: `wait=False` for a periodic one (in the background under `checkpoint.async`);
        returns the seconds training waited."""
        best, self.asked = self.asked == "best", ""
        seconds = self.checkpointer.save(wait, best)
        self.window.pause(seconds)
        self.slow = True
        return seconds

    def _log(self, out: StepOutput) -> None:
        state, first = self.state, next(iter(self.engines.values()))
        means, rate, seconds = self.window.reduce()
        state.train_time_s += seconds
        metrics = {f"train/{k}": v for k, v in means.items()}
        metrics.update(
            {
                "train/lr": first.lr,
                "train/grad_norm": float(out.grad_norm),
                "train/samples_per_s": rate,
                "train/samples_seen": state.samples_seen,
                "train/epoch": state.epoch + state.batch_in_epoch / (self.per_epoch * self.micro),
            }
        )
        scale = first.loss_scale()
        if scale is not None:  # fp16: the loss scale the scaler settled on
            metrics["train/loss_scale"] = scale
        metrics.update({f"train/{k}": v for k, v in self._token_rates(rate).items()})
        metrics.update(self.task.train_metrics(metrics))
        self.tracker.log_metrics(metrics, state.step)
        self.progress.update(
            state.step,
            self.total_steps,
            metrics,
            (self.total_steps - state.step) * self.samples_per_step / max(rate, 1e-9),
        )
        self.final_loss = metrics["train/loss"]
        self.window.reset()

    def _token_rates(self, samples_per_s: float) -> dict[str, float]:
        task = self.task
        return timing.token_rates(
            task.tokens_per_sample(),
            samples_per_s,
            task.flops_per_token() or 6.0 * self.parameters,
            self.plan.world_size,
            self.device,
            self.cfg.model.peak_tflops,
        )

    def _summary(self) -> dict[str, Any]:
        state, plan, first = self.state, self.plan, next(iter(self.engines.values()))
        elapsed = state.train_time_s - self.steady_t
        throughput = (state.samples_seen - self.steady_samples) / elapsed if elapsed > 0 else None
        summary: dict[str, Any] = {
            "steps": state.step,
            "samples_seen": state.samples_seen,
            "world_size": plan.world_size,
            "global_batch_size": plan.global_batch,
            "per_rank_batch_size": plan.per_rank,
            "grad_accum_steps": plan.accum,
            "lr": first.lr_info.peak,
            "scale_rule": first.lr_info.rule,
            "engine": first.name,
            "precision": self.cfg.precision,
            "initial_loss": state.initial_loss,
            "final_loss": self.final_loss,
            "eval": self.evaluator.last,
            "throughput": throughput,
            **self._token_rates(throughput or 0.0),
            "train_time_s": state.train_time_s,
            "epochs": state.epoch + state.batch_in_epoch / (self.per_epoch * self.micro),
            "peak_memory_mb": report.peak_memory_mb(self.device),
        }
        if self.cfg.compile:  # the first step's time beyond a steady step's: compiling
            steady_step_s = self.samples_per_step / throughput if throughput else 0.0
            summary["compile_s"] = max(0.0, self.first_step_s - steady_step_s)
        for f in self.features:
            summary |= f.summary(self)
        return summary | self.task.summary_extras(summary)


def _name(feature: Feature) -> str:
    """A feature's name in a checkpoint: its section's key, else its class's."""
    return feature.key or type(feature).__name__.lower()
