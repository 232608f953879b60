"""`fit`: build everything a recipe names, train it, and leave what a run leaves.

In the shape of torchvision's reference `main()`: set up (the task, its data, one engine per
model, the recipe's features), resume, track, train (`dtrain.train.loop`), save. How the run
ended is an `Outcome`, never an exception through the loop; from the MLflow run's opening on,
every way out ends that run (no run is left RUNNING).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sized, cast

import torch
from torch.utils.data import DataLoader, Dataset

from dtrain import data, features, tracking
from dtrain.config import Config, recipe, redact
from dtrain.engines import build_engines, evaluation_weights
from dtrain.engines.precision import set_fp32_matmuls
from dtrain.errors import ConfigError
from dtrain.protocols import BaseTask, Clock, Engine, Tracker
from dtrain.runtime import distributed, files, preemption
from dtrain.tasks import get_task
from dtrain.train import config as job_config
from dtrain.train import report, resume
from dtrain.train.loop import Loop, Outcome, Parts
from dtrain.train.outputs import write_outputs
from dtrain.train.state import TrainState, seed_everything

log = logging.getLogger("dtrain")

__all__ = ["Outcome", "Parts", "build", "fit", "task_and_data"]


def task_and_data(
    cfg: Config, num_workers: int, pin_memory: bool = False, augment: bool = True
) -> tuple[data.BatchPlan, BaseTask, Dataset[Any], Dataset[Any], DataLoader[Any]]:
    """The recipe's task, its (train, eval) datasets and this rank's training loader (with the
    task's augmentation unless `augment` is off), built alike on every rank."""
    plan = data.plan_batches(cfg, distributed.world_size())
    task = get_task(cfg.task)(cfg)
    train_ds, eval_ds = task.datasets()
    loader = data.train_loader(
        train_ds, plan, distributed.rank(), cfg.seed, num_workers, pin_memory, task.augmentation() if augment else None
    )
    return plan, task, train_ds, eval_ds, loader


def build(cfg: Config, device: torch.device) -> Parts:
    """The task, its data sharded for this rank, and one engine per model."""
    job_config.validate(cfg)  # raw torchrun launches reach here without the CLI's check: refuse before any work
    world, rank = distributed.world_size(), distributed.rank()
    plan, task, train_ds, eval_ds, loader = task_and_data(cfg, cfg.data.num_workers, device.type == "cuda")
    eval_dl = data.eval_loader(eval_ds, cfg.data.eval_batch_size, world, rank, cfg.data.num_workers)
    micro = task.micro_batches_per_step(plan.accum)
    per_epoch = data.steps_per_epoch(loader, micro)
    if per_epoch == 0:
        raise ConfigError(
            "data.global_batch_size",
            plan.global_batch,
            f"larger than the training set ({len(cast(Sized, train_ds))} samples); lower it",
        )
    total_steps = cfg.train.max_steps or cfg.train.epochs * per_epoch

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and world size
    cfg.model.init_from = cfg.model.init_from or next(
        (start for f in features.enabled(cfg) if (start := f.start_weights(cfg))), ""
    )
    specs = task.models()
    for spec in specs.values():
        if spec.optim.warmup_epochs > 0:
            spec.optim.warmup_steps = round(spec.optim.warmup_epochs * per_epoch * spec.optimizer_steps_per_step)
    parameters = sum(p.numel() for spec in specs.values() for p in spec.module.parameters())
    engines = build_engines(cfg, specs, device, plan, total_steps)
    fp32_matmuls = set_fp32_matmuls(cfg.allow_tf32, device)
    seed_everything(cfg.seed + rank)  # per-rank streams for dropout / noise (augmentation has per-sample ones)
    return Parts(task, plan, loader, eval_dl, micro, per_epoch, total_steps, engines, fp32_matmuls, parameters)


def start_tracking(
    cfg: Config, env: distributed.DistEnv, plan: data.BatchPlan, engines: dict[str, Engine], state: TrainState
) -> Tracker:
    """Rank 0 opens (or, resuming, reopens) the MLflow run; every rank learns its id."""
    tracker: Tracker = tracking.NullTracker()
    if distributed.is_main():
        params = recipe.flatten(redact.tree(recipe.to_dict(cfg)))
        # What differs between a 1-rank and an N-rank run of one recipe: params, so MLflow's
        # compare view shows them side by side (tags are not compared there).
        params |= {"world_size": plan.world_size, "per_rank_batch_size": plan.per_rank}
        tags = redact.tree(report.run_tags(cfg, env, plan, engines))
        if state.resumed_from_run:  # resumed into a new output_dir: a new run, linked to the old one
            tags["dtrain.resumed_from_run"] = state.resumed_from_run
        out_dir = Path(cfg.output_dir)
        run_id = state.run_id or ("" if state.resumed_from_run else resume.earlier_attempt_run(out_dir))
        tracker = tracking.start(cfg, params, tags, run_id=run_id or None)
        state.run_id = tracker.run_id or state.run_id
        resume.mark_job(out_dir, state.run_id)
    state.run_id = distributed.broadcast_object(state.run_id)
    return tracker


def fit(cfg: Config, env: distributed.DistEnv, device: torch.device) -> Outcome:
    """Train `cfg` on this rank (the process group is already up) and say how it ended."""
    files.keep_private(cfg.private)
    loop, resumed_from = prepare(cfg, device)
    status, links, outcome = "FAILED", None, None
    tracker: Tracker = tracking.NullTracker()
    try:  # from the run's opening on, every way out ends it (finally): no run is left RUNNING
        tracker = start_tracking(cfg, env, loop.plan, loop.engines, loop.state)
        loop.begin(tracker, report.describe(cfg, loop.plan, loop.engines, loop.total_steps, loop.fp32_matmuls)
                   + (f" | resumed at step {loop.state.step} from {resumed_from}" if resumed_from else "")
                   + (f" | mlflow run {loop.state.run_id}" if loop.state.run_id else ""))  # fmt: skip
        for line in report.lr_warnings(loop.engines, loop.plan):
            loop.say(line)
        if links := tracker.links():
            loop.say(links)
        with preemption.at_step_boundaries(cfg.train.collective_timeout_s):
            outcome = loop.run()
        status = conclude(cfg, loop, outcome, tracker)
        return outcome
    except KeyboardInterrupt:  # a stop signal outside the steps: the run was stopped, not failed
        status = "KILLED"
        raise
    finally:
        preemption.hold()
        if outcome is None:  # an error or a stop signal: the features settle, without collectives
            for f in loop.features:
                f.end(loop, "failed")
            said = loop.checkpointer.settle(min(cfg.train.collective_timeout_s, 60.0))
            if said:  # a background write in flight
                loop.say(said)
        loop.progress.close()
        for loader in (loop.train_loader, loop.eval_loader):
            data.close(loader)
        tracker.finish(status)
        if links:  # again at the end, where a user looks when the job is done
            print(links, flush=True)


def prepare(cfg: Config, device: torch.device) -> tuple[Loop, str]:
    """Everything before the run is tracked: the parts, the features, the resumed checkpoint
    (its folder's name, "" for a fresh start), each feature's setup, config.yaml."""
    clock = Clock(began=time.time())
    out_dir = Path(cfg.output_dir)
    resume.refuse_to_overwrite(cfg, out_dir / "checkpoints")
    parts = build(cfg, device)
    state = TrainState(world_size=parts.plan.world_size, global_batch=parts.plan.global_batch,
                       grad_accum=parts.plan.accum)  # fmt: skip
    loop = Loop(cfg, parts, device, state, clock)
    loop.add_features(features.enabled(cfg))
    resumed = resume.resume(cfg, parts.task, parts.engines, loop.parts, state, out_dir / "checkpoints")
    if resumed is not None:
        loop.load_feature_states(resumed[1].get("features", {}))
    clock.loaded = time.time()
    loop.setup()
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        recipe.dump_yaml(cfg, out_dir / "config.yaml")
    return loop, resumed[0].name if resumed else ""


def conclude(cfg: Config, loop: Loop, outcome: Outcome, tracker: Tracker) -> str:
    """Write what the outcome leaves behind and say it; returns the MLflow run's final status."""
    out_dir = Path(cfg.output_dir)
    if outcome.status == "finished":
        with evaluation_weights(loop.engines):  # a schedule-free optimizer's average
            weights = loop.task.final_state_dict(loop.engines)  # collective under ZeRO-3 and FSDP
        if distributed.is_main():
            outcome.summary["run_id"] = loop.state.run_id
            write_outputs(cfg, loop.task, loop.engines, weights, outcome.summary, out_dir, tracker)
            (out_dir / resume.JOB_MARK).unlink(missing_ok=True)  # finished: a later job opens its own run
        loop.say(report.closing_line(cfg, outcome.summary, out_dir))
        return "FINISHED"
    if outcome.status == "halted":
        tracker.set_tags({"dtrain.halted_at_step": outcome.step, "dtrain.halted_by": outcome.reason})
    elif outcome.status == "stopped":
        loop.say(
            f"stopped after step {outcome.step} of {loop.total_steps} (train.stop_at_step); "
            f"resume=auto continues from {out_dir / 'checkpoints'}"
        )
        tracker.set_tags({"dtrain.stopped_at_step": outcome.step})
    else:
        tracker.set_tags({"dtrain.preempted_at_step": outcome.step, "dtrain.preempted_by": outcome.signum})
    return "KILLED"
