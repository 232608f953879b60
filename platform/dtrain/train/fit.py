"""`fit`: build everything a recipe names, run the loop, evaluate, checkpoint, report.

The per-step data path lives in the task's `train_step` (for supervised tasks
`dtrain.tasks.supervised.train_step`); this file is the loop around it, in the shape of
torchvision's reference `main()`: set up, resume, train, evaluate, save. The loop's parts
(`dtrain.train.loop_parts`) decide when they act (`Checkpointer.due`, `Evaluator.due_*`,
`MetricsWindow.due`), so the loop itself reads on one screen; what the run reports (tags,
the start line, model.pt and summary.json) is `dtrain.train.report`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sized, cast

import torch
from torch.utils.data import DataLoader, Dataset

from dtrain import checkpoint, data, tracking
from dtrain.runtime import distributed
from dtrain.features import goodput
from dtrain.train import objective
from dtrain.runtime import preemption
from dtrain.features import profile
from dtrain.config import recipe
from dtrain.config import redact
from dtrain.train import report
from dtrain.train import resume
from dtrain.config import Config
from dtrain.errors import ConfigError
from dtrain.errors import WorkFailed
from dtrain.features.ema import EMA
from dtrain.engines import build_engines, evaluation_weights, validate
from dtrain.engines.precision import set_fp32_matmuls
from dtrain.runtime.files import atomic_write
from dtrain.train.loop_parts import Checkpointer, EarlyStopping, Evaluator, MetricsWindow, check_metric_keys
from dtrain.features.monitor import Monitor
from dtrain.features.profile import Profiler, region
from dtrain.train.progress import Progress
from dtrain.protocols import Engine, StepOutput, Task
from dtrain.train.resume import TrainState, seed_everything
from dtrain.tasks import get_task
from dtrain.errors import TrainingError as TrainingError

log = logging.getLogger("dtrain")


@dataclass
class Parts:
    """Everything a recipe names, built alike on every rank."""

    task: Task
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
    ema: EMA | None
    parameters: int
    """The models' parameters, counted before any engine shards them."""
    combined: objective.Combined
    """Distillation, EWC and pruning, when the recipe asks for them."""

    def saved(self) -> dict[str, Any]:
        """What a checkpoint holds beside the trainer's state."""
        return {**self.engines, **({"ema": self.ema} if self.ema is not None else {})}


def task_and_data(cfg: Config, num_workers: int, pin_memory: bool = False, augment: bool = True) -> tuple[
        data.BatchPlan, Task, Dataset[Any], Dataset[Any], DataLoader[Any]]:
    """The recipe's task, its (train, eval) datasets and this rank's training loader (with the
    task's augmentation unless `augment` is off), built alike on every rank."""
    plan = data.plan_batches(cfg, distributed.world_size())
    task = get_task(cfg.task)(cfg)
    train_ds, eval_ds = task.datasets()
    loader = data.train_loader(train_ds, plan, distributed.rank(), cfg.seed, num_workers, pin_memory,
                               task.augmentation() if augment else None)
    return plan, task, train_ds, eval_ds, loader


def build(cfg: Config, device: torch.device) -> Parts:
    """The task, its data sharded for this rank, and one engine per model."""
    validate(cfg)  # raw torchrun launches reach here without the CLI's check: refuse before any work
    world, rank = distributed.world_size(), distributed.rank()
    plan, task, train_ds, eval_ds, loader = task_and_data(cfg, cfg.data.num_workers, device.type == "cuda")
    eval_dl = data.eval_loader(eval_ds, cfg.data.eval_batch_size, world, rank, cfg.data.num_workers)
    micro = task.micro_batches_per_step(plan.accum)
    per_epoch = data.steps_per_epoch(loader, micro)
    if per_epoch == 0:
        raise ConfigError("data.global_batch_size", plan.global_batch,
                          f"larger than the training set ({len(cast(Sized, train_ds))} samples); lower it")
    total_steps = cfg.train.max_steps or cfg.train.epochs * per_epoch

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and world size
    specs = task.models()
    for spec in specs.values():
        if spec.optim.warmup_epochs > 0:
            spec.optim.warmup_steps = round(spec.optim.warmup_epochs * per_epoch * spec.optimizer_steps_per_step)
    parameters = sum(p.numel() for spec in specs.values() for p in spec.module.parameters())
    engines = build_engines(cfg, specs, device, plan, total_steps)
    fp32_matmuls = set_fp32_matmuls(cfg.allow_tf32, device)
    ema = EMA(cfg.ema, engines, plan.global_batch, cfg.optim.base_batch_size) if cfg.ema.decay else None
    combined = objective.build(cfg, task, engines, eval_dl, device, total_steps)
    if combined.objective is not None:
        setattr(task, "objective", combined.objective)  # the supervised step's extra loss terms
    seed_everything(cfg.seed + rank)  # per-rank streams for dropout / noise (augmentation has per-sample ones)
    return Parts(task, plan, loader, eval_dl, micro, per_epoch, total_steps, engines, fp32_matmuls, ema, parameters,
                 combined)


def start_tracking(cfg: Config, env: distributed.DistEnv, parts: Parts, state: TrainState) -> tracking.NullTracker:
    """Rank 0 opens (or, resuming, reopens) the MLflow run; every rank learns its id."""
    tracker: tracking.NullTracker = tracking.NullTracker()
    if distributed.is_main():
        params = recipe.flatten(redact.tree(recipe.to_dict(cfg)))
        # What differs between a 1-rank and an N-rank run of one recipe: params, so MLflow's
        # compare view shows them side by side (tags are not compared there).
        params |= {"world_size": parts.plan.world_size, "per_rank_batch_size": parts.plan.per_rank}
        tags = report.run_tags(cfg, env, parts.plan, parts.engines)
        if state.resumed_from_run:  # resumed into a new output_dir: a new run, linked to the old one
            tags["dtrain.resumed_from_run"] = state.resumed_from_run
        tracker = tracking.start(cfg, params, tags, run_id=state.run_id or None)
        state.run_id = tracker.run_id or state.run_id
    state.run_id = distributed.broadcast_object(state.run_id)
    return tracker


@dataclass(frozen=True)
class Outcome:
    """How `fit` ended. Only "finished" wrote model.pt and summary.json (`summary`, on rank 0);
    "stopped" (`train.stop_at_step`) and "preempted" (by signal `signum`) checkpointed for the
    next attempt; "pruned" is a search trial its study stopped (`value`: the metric it saw)."""

    status: Literal["finished", "stopped", "preempted", "pruned"]
    step: int
    summary: dict[str, Any] = field(default_factory=dict)
    signum: int = 0
    value: float = math.nan


def fit(cfg: Config, env: distributed.DistEnv, device: torch.device) -> Outcome:
    """Train `cfg` on this rank (the process group is already up) and say how it ended."""
    goodput.mark("begin")
    out_dir = Path(cfg.output_dir)
    resume.refuse_to_overwrite(cfg, out_dir / "checkpoints")
    parts = build(cfg, device)
    state = TrainState(world_size=parts.plan.world_size, global_batch=parts.plan.global_batch,
                       grad_accum=parts.plan.accum)
    resumed_from = resume.resume(cfg, parts.task, parts.saved(), state, out_dir / "checkpoints")
    goodput.mark("loaded")
    check_metric_keys(cfg, parts.task, parts.engines, parts.eval_loader, device)
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        recipe.dump_yaml(cfg, out_dir / "config.yaml")
    progress = Progress(parts.total_steps, state.step, distributed.is_main())
    status, loop, links = "FAILED", None, None
    tracker: tracking.NullTracker = tracking.NullTracker()
    try:  # from the run's opening on, every way out ends it (finally): no run is left RUNNING
        tracker = start_tracking(cfg, env, parts, state)
        progress.write(report.describe(cfg, parts.plan, parts.engines, parts.total_steps, parts.fp32_matmuls)
                       + (f" | {parts.ema.describe()}" if parts.ema else "")
                       + (f" | resumed at step {state.step} from {resumed_from.name}" if resumed_from else "")
                       + (f" | mlflow run {state.run_id}" if state.run_id else ""))
        for line in [*parts.combined.lines, *report.lr_warnings(parts.engines, parts.plan)]:
            progress.write(line)
        if parts.combined.teacher_eval:  # constant: beside the student's curves from the start
            tracker.log_metrics({f"teacher/{k}": v for k, v in parts.combined.teacher_eval.items()}, state.step)
        if links := tracker.links():
            progress.write(links)
        loop = Loop(cfg, parts, device, state, tracker, progress)
        with preemption.at_step_boundaries(cfg.train.collective_timeout_s):
            outcome = loop.run()
        status = conclude(cfg, parts, state, outcome, tracker, progress)
        return outcome
    except KeyboardInterrupt:  # a stop signal outside the steps: the run was stopped, not failed
        status = "KILLED"
        raise
    finally:
        preemption.hold()
        if loop is not None:  # an error or a stop left a background write in flight
            loop.ledger.write()  # how far this attempt got, for the next one's account
            loop.checkpointer.settle(min(cfg.train.collective_timeout_s, 60.0))
        progress.close()
        tracker.finish(status)
        if links:  # again at the end, where a user looks when the job is done
            print(links, flush=True)


def conclude(cfg: Config, parts: Parts, state: TrainState, outcome: Outcome, tracker: tracking.NullTracker,
             progress: Progress) -> str:
    """Write what the outcome leaves behind and say it; returns the MLflow run's final status."""
    out_dir = Path(cfg.output_dir)
    if outcome.status == "finished":
        weights = final_weights(cfg, parts)
        if distributed.is_main():
            outcome.summary["run_id"] = state.run_id
            report.write_outputs(cfg, parts.task, parts.engines, weights, outcome.summary, out_dir, tracker)
        for line in [*report.profile_lines(outcome.summary), report.closing_line(cfg, outcome.summary, out_dir)]:
            progress.write(line)
        return "FINISHED"
    if outcome.status == "pruned":  # says so to the search (pruned.json), not an error
        progress.write(f"trial pruned after step {outcome.step} ({cfg.trial.metric} {outcome.value:.4g})")
        tracker.set_tags({"dtrain.pruned_at_step": outcome.step})
        if distributed.is_main():
            text = json.dumps({"pruned_at_step": outcome.step, "value": outcome.value}) + "\n"
            atomic_write(out_dir / "pruned.json", lambda tmp: tmp.write_text(text))
    elif outcome.status == "stopped":
        progress.write(f"stopped after step {outcome.step} of {parts.total_steps} (train.stop_at_step); "
                       f"resume=auto continues from {out_dir / 'checkpoints'}")
        tracker.set_tags({"dtrain.stopped_at_step": outcome.step})
    else:
        tracker.set_tags({"dtrain.preempted_at_step": outcome.step, "dtrain.preempted_by": outcome.signum})
    return "KILLED"


class Loop:
    """The training loop and its parts. `run` trains until the run is done or stops, and says which."""

    def __init__(self, cfg: Config, parts: Parts, device: torch.device, state: TrainState,
                 tracker: tracking.NullTracker, progress: Progress):
        self.cfg, self.task, self.engines, self.loader, self.device = cfg, parts.task, parts.engines, parts.loader, device
        self.plan, self.micro, self.per_epoch = parts.plan, parts.micro, parts.per_epoch
        self.total_steps, self.state, self.tracker, self.progress = parts.total_steps, state, tracker, progress
        self.ema, self.parameters = parts.ema, parts.parameters
        self.pruner, self.teacher_eval = parts.combined.pruner, parts.combined.teacher_eval
        if self.pruner is not None:
            self._pruned(self.pruner.begin(state.step))
        self.ledger = goodput.Ledger(Path(cfg.output_dir) / goodput.FILE, distributed.is_main())
        self.ledger.open(continues=bool(cfg.resume), step=state.step)
        self.checkpointer = Checkpointer(cfg, self.task, self.engines, state, progress, parts.saved(), self.ledger,
                                         tracker)
        if self.checkpointer.auto is not None:  # from the δ the earlier attempts measured, if any
            self.checkpointer.retune(self.ledger.delta_estimate(), self.total_steps)
        self.evaluator = Evaluator(cfg, self.task, self.engines, parts.eval_loader, device, tracker, progress, self.ema)
        self.window = MetricsWindow(cfg.tracking.log_every)
        self.stopper = EarlyStopping.of(cfg, self.task, state)
        self.saved = parts.saved()
        self.monitor = Monitor(cfg.monitor, self.engines)
        self.profiler = Profiler(cfg.profile, Path(cfg.output_dir), device)
        self.samples_per_step = self.plan.per_rank * self.plan.world_size * self.micro
        self.bad_steps = 0
        self.final_loss = float("nan")
        self.steady_from = state.step + min(5, max(0, self.total_steps - state.step - 1))
        self.steady_t, self.steady_samples = 0.0, 0
        self.first_step_s = 0.0
        """Wall time of this invocation's first step: with `compile`, mostly compiling."""
        self.preempted_by = 0
        """The stop signal every rank agreed on (checkpointed at that step), or 0."""

    def done(self) -> bool:
        return (self.state.step >= self.total_steps or 0 < self.cfg.train.stop_at_step <= self.state.step
                or self.converged() or self.preempted_by > 0 or self.evaluator.pruned is not None)

    def converged(self) -> bool:
        """`early_stop.patience` evaluations without improvement: training ends here."""
        return self.stopper is not None and self.stopper.exhausted

    def run(self) -> Outcome:
        with self.profiler:
            self._train()
        preemption.settle()
        outcome = self._end()
        totals = self.ledger.end(outcome.status)
        self.tracker.log_metrics(goodput.metrics(totals), self.state.step)
        self.progress.write(totals.line())
        if outcome.status == "finished":
            outcome.summary["goodput"] = {**asdict(totals), "by_attempt": self.ledger.records()}
        return outcome

    def _end(self) -> Outcome:
        """After the last step: the final evaluation and checkpoint, and how the run ended."""
        state = self.state
        if self.preempted_by:
            return Outcome("preempted", state.step, signum=self.preempted_by)
        if self.evaluator.pruned is not None:
            return Outcome("pruned", state.step, value=self.evaluator.pruned.value)
        if state.step < self.total_steps and not self.converged():  # train.stop_at_step
            self._checkpoint("")
            return Outcome("stopped", state.step)
        if self.evaluator.last_step != state.step:
            self._evaluate()
        self._checkpoint("")
        if self.stopper is not None and self.stopper.cfg.restore_best and state.best_step != state.step:
            best = Path(state.best_checkpoint) if state.best_checkpoint else None
            if best is not None and distributed.agree((best / checkpoint.TRAINER).exists()):
                checkpoint.load(best, self.saved)  # collective: model.pt is written from these weights
                self.progress.write(f"early_stop: model.pt from step {state.best_step} "
                                    f"({self.stopper.cfg.metric} {state.best_value:.4g}) of {best.parent}")
            else:
                self.progress.write(f"early_stop: the best checkpoint (step {state.best_step}) is not there any "
                                    f"more ({best}); model.pt holds the weights of step {state.step}")
        return Outcome("finished", state.step, self._summary())

    def _evaluate(self) -> None:
        """Evaluate; under early stopping, checkpoint an improvement and mark it `best`."""
        seconds = self.evaluator.run(self.state)
        self.window.pause(seconds)
        self.ledger.charge("eval", seconds)
        if self.stopper is not None and self.stopper.improved(self.evaluator.last, self.state.step):
            self.state.best_checkpoint = str((self.checkpointer.root / f"step_{self.state.step:08d}").resolve())
            self._checkpoint("")
            if distributed.is_main():
                checkpoint.mark_best(self.checkpointer.root, self.checkpointer.root / f"step_{self.state.step:08d}")

    def _train(self) -> None:
        """Steps until the run is done or stops (preemption); evaluation at epoch ends."""
        state = self.state
        while not self.done():
            for batches in self._epoch():
                t0 = time.perf_counter()
                with self.monitor.watch(state.step + 1), preemption.step():
                    out = self.task.train_step(self.engines, batches)
                self._after_step(out)
                self.ledger.stepped(state.step, self.window.due(state.step, self.total_steps))
                self.first_step_s = self.first_step_s or time.perf_counter() - t0
                self.profiler.step()
                if not self.done() and preemption.requested(state.step):  # collective: all ranks stop after the same step
                    self._checkpoint(f"preempted by signal {preemption.signal_number()} at step {state.step}")
                    self.preempted_by = preemption.signal_number()
                if self.done():
                    break
            if state.batch_in_epoch == self.per_epoch * self.micro:  # the epoch ran out
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                if self.evaluator.due_at_epoch_end(state.step, self.total_steps):
                    self._evaluate()

    def _epoch(self) -> Iterator[list[Any]]:
        """This epoch's remaining steps, each a list of `micro` loader batches."""
        state = self.state
        data.set_position(self.loader, state.epoch, state.batch_in_epoch * self.plan.per_rank)
        batches = data.start(self.loader)
        for _ in range(state.batch_in_epoch // self.micro, self.per_epoch):
            with region("data"):
                step_batches = [data.move(next(batches), self.device) for _ in range(self.micro)]
            yield step_batches

    def _after_step(self, out: StepOutput) -> None:
        state = self.state
        state.step += 1
        state.batch_in_epoch += self.micro
        state.samples_seen += self.samples_per_step
        if self.pruner is not None:  # before the EMA sees the weights
            self._pruned(self.pruner.after_step(state.step))
        if self.ema is not None and out.stepped:
            self.ema.update()
        self.window.add(out, self.samples_per_step)
        if math.isnan(state.initial_loss):
            state.initial_loss = float(distributed.all_reduce_mean(out.loss.detach().clone().double()))
        self.bad_steps = 0 if out.stepped else self.bad_steps + 1
        if self.bad_steps >= self.cfg.train.max_nonfinite_steps:
            raise TrainingError(f"gradient norm non-finite for {self.bad_steps} consecutive steps at step "
                                f"{state.step} (lower optim.lr, set optim.clip_grad_norm, or use precision=bf16)")
        if self.window.due(state.step, self.total_steps):
            self._log(out)
        if self.monitor.due(state.step):
            self.tracker.log_metrics({f"monitor/{k}": v for k, v in self.monitor.metrics.items()}, state.step)
        if state.step == self.steady_from:
            self.steady_t = state.train_time_s + (time.perf_counter() - self.window.t0)
            self.steady_samples = state.samples_seen
            preemption.pace(self.ledger.step_time())  # collective, once
        if self.evaluator.due_after_step(state.step):
            self._evaluate()
        self.checkpointer.poll()
        if self.checkpointer.due(self.total_steps):
            self._checkpoint("", wait=False)

    def _pruned(self, sparsity: float | None) -> None:
        """After a pruning round: the sparsity it reached, logged and said."""
        if sparsity is not None:
            self.tracker.log_metrics({"prune/sparsity": sparsity}, self.state.step)
            self.progress.write(f"prune: step {self.state.step}, {sparsity:.2%} of the prunable weights are zero")

    def _checkpoint(self, reason: str, wait: bool = True) -> None:
        """Write one; `wait=False`: a periodic one (in the background under `checkpoint.async`)."""
        seconds = self.checkpointer.save(wait)
        self.window.pause(seconds)
        self.ledger.charge("checkpoint", seconds)
        if not wait and self.checkpointer.auto is not None:
            self.checkpointer.retune(seconds, self.total_steps)
        self.tracker.log_metrics(goodput.metrics(self.ledger.write()), self.state.step)
        if reason:
            self.progress.write(f"{reason}: checkpoint written in {seconds:.2f}s to {self.checkpointer.root}; "
                                f"resume=auto continues from step {self.state.step}")

    def _log(self, out: StepOutput) -> None:
        state, first = self.state, next(iter(self.engines.values()))
        means, rate, seconds = self.window.reduce()
        state.train_time_s += seconds
        metrics = {f"train/{k}": v for k, v in means.items()}
        metrics.update({"train/lr": first.lr, "train/grad_norm": float(out.grad_norm), "train/samples_per_s": rate,
                        "train/samples_seen": state.samples_seen,
                        "train/epoch": state.epoch + state.batch_in_epoch / (self.per_epoch * self.micro)})
        scale = first.loss_scale()
        if scale is not None:  # fp16: the loss scale the scaler settled on
            metrics["train/loss_scale"] = scale
        metrics.update({f"train/{k}": v for k, v in self._token_rates(rate).items()})
        metrics.update(self.task.train_metrics(metrics))
        self.tracker.log_metrics(metrics, state.step)
        self.progress.update(state.step, self.total_steps, metrics,
                             (self.total_steps - state.step) * self.samples_per_step / max(rate, 1e-9))
        self.final_loss = metrics["train/loss"]
        self.window.reset()

    def _token_rates(self, samples_per_s: float) -> dict[str, float]:
        task = self.task
        return profile.token_rates(task.tokens_per_sample(), samples_per_s,
                                     task.flops_per_token() or 6.0 * self.parameters, self.plan.world_size,
                                     self.device, self.cfg.model.peak_tflops)

    def _summary(self) -> dict[str, Any]:
        state, plan, first = self.state, self.plan, next(iter(self.engines.values()))
        elapsed = state.train_time_s - self.steady_t
        throughput = (state.samples_seen - self.steady_samples) / elapsed if elapsed > 0 else None
        summary = {
            "steps": state.step, "samples_seen": state.samples_seen, "world_size": plan.world_size,
            "global_batch_size": plan.global_batch, "per_rank_batch_size": plan.per_rank,
            "grad_accum_steps": plan.accum, "lr": first.lr_info.peak, "scale_rule": first.lr_info.rule,
            "engine": first.name, "precision": self.cfg.precision, "initial_loss": state.initial_loss,
            "final_loss": self.final_loss, "eval": self.evaluator.last,
            **({"eval_ema": self.evaluator.last_ema} if self.ema is not None else {}),
            **({"teacher_eval": self.teacher_eval} if self.teacher_eval else {}),
            **({"sparsity": self.pruner.measure()} if self.pruner is not None else {}),
            **({"early_stop": {"metric": self.cfg.early_stop.metric, "best_value": state.best_value,
                               "best_step": state.best_step, "stopped_early": self.converged()}}
               if self.stopper is not None and self.stopper.stops else {}),
            **({"best": {"metric": self.stopper.cfg.metric, "value": state.best_value, "step": state.best_step,
                         "checkpoint": state.best_checkpoint}} if self.stopper is not None else {}),
            "throughput": throughput,
            **self._token_rates(throughput or 0.0),
            "train_time_s": state.train_time_s,
            "epochs": state.epoch + state.batch_in_epoch / (self.per_epoch * self.micro),
            "peak_memory_mb": report.peak_memory_mb(self.device),
        }
        if self.cfg.compile:  # the first step's time beyond a steady step's: compiling
            steady_step_s = self.samples_per_step / throughput if throughput else 0.0
            summary["compile_s"] = max(0.0, self.first_step_s - steady_step_s)
        profiles = distributed.all_gather_object(self.profiler.breakdown)
        if any(profiles):  # ms per recorded step, by profiled rank
            summary["profile"] = {str(r): p for r, p in enumerate(profiles) if p}
        return summary | self.task.summary_extras(summary)


def final_weights(cfg: Config, parts: Parts) -> dict[str, torch.Tensor]:
    """model.pt's state_dict: the raw weights, or with `ema.save` the average (collective)."""
    if parts.ema is None or not cfg.ema.save:
        with evaluation_weights(parts.engines):  # a schedule-free optimizer's average
            return parts.task.final_state_dict(parts.engines)  # collective under ZeRO-3 and FSDP
    with parts.ema.swapped():
        for engine in parts.engines.values():
            engine.sync_buffers()
        return parts.task.final_state_dict(parts.engines)
