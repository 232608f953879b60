"""`fit`: build everything a recipe names, run the loop, evaluate, checkpoint, report.

The per-step data path is `dtrain.engine.train_step`; this file is the loop around it,
in the shape of torchvision's reference `main()`: set up, resume, train, evaluate, save.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dtrain
from dtrain import checkpoint, config, data, distributed, tracking
from dtrain.config import Config, ConfigError
from dtrain.engine import DDPEngine, train_step
from dtrain.norm import convert_sync_batchnorm
from dtrain.tasks import Task, get_task

log = logging.getLogger("dtrain")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. gradients stay non-finite); str() is the line to show."""


@dataclass
class TrainState:
    """Where the loop is: saved in every checkpoint, restored on resume."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    initial_loss: float = float("nan")
    run_id: str = ""
    train_time_s: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_engine(cfg: Config, model: torch.nn.Module, device: torch.device, plan: data.BatchPlan,
                 total_steps: int):
    if cfg.engine == "deepspeed":
        from dtrain.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, device=device, plan=plan, total_steps=total_steps)
    return DDPEngine(model, cfg.optim, precision=cfg.precision, device=device, global_batch=plan.global_batch,
                     total_steps=total_steps, broadcast_buffers=not cfg.model.sync_bn)


@torch.no_grad()
def evaluate(task: Task, engine, loader, device: torch.device) -> dict[str, float]:
    """Exact sharded evaluation: per-rank sums over disjoint shards, all-reduced."""
    model = engine.module
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for batch in loader:
        with engine.autocast():
            out = task.eval_sums(model, data.move(batch, device))
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + v.detach().double()
    keys = sorted(sums)
    reduced = distributed.all_reduce_sum(torch.stack([sums[k] for k in keys]))
    model.train(was_training)
    return {k: float(v) for k, v in task.eval_metrics(dict(zip(keys, reduced.tolist()))).items()}


def run_tags(cfg: Config, env: distributed.DistEnv, plan: data.BatchPlan, peak_lr: float, engine) -> dict[str, Any]:
    try:  # the version only: importing deepspeed costs seconds and probes accelerators
        ds_version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        ds_version = "not installed"
    tags = {
        "dtrain.world_size": plan.world_size, "dtrain.nodes": env.num_nodes, "dtrain.backend": distributed.backend(),
        "dtrain.launcher": env.launcher, "dtrain.engine": engine.name, "dtrain.precision": cfg.precision,
        "dtrain.global_batch": plan.global_batch, "dtrain.per_rank_batch": plan.per_rank,
        "dtrain.grad_accum": plan.accum, "dtrain.scaled_lr": f"{peak_lr:.6g}", "dtrain.scale_rule": cfg.optim.scale_rule,
        "dtrain.host": distributed.hostname(), "dtrain.recipe": cfg.recipe, "dtrain.task": cfg.task,
        "dtrain.version": dtrain.__version__, "dtrain.torch": torch.__version__, "dtrain.deepspeed": ds_version,
        "dtrain.python": platform.python_version(), "dtrain.device": str(engine.device.type),
        "dtrain.run_label": f"{cfg.recipe}-{plan.world_size}x",
    }
    commit = tracking.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


class Progress:
    """Rank 0: a tqdm bar on a terminal, plain log lines otherwise; other ranks: silent."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, total: int, metrics: dict[str, float], eta_s: float) -> None:
        if not self.enabled:
            return
        short = {"loss": metrics["train/loss"], "lr": metrics["train/lr"], "samples/s": metrics["train/samples_per_s"]}
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in short.items()}, refresh=True)
        else:
            print(f"step {step}/{total} loss {short['loss']:.4f} lr {short['lr']:.4g} "
                  f"grad_norm {metrics['train/grad_norm']:.3g} samples/s {short['samples/s']:.1f} "
                  f"eta {eta_s:.0f}s", flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fit(cfg: Config, env: distributed.DistEnv, device: torch.device) -> dict[str, Any]:
    """Train `cfg` on this rank (the process group is already up). Returns the summary (rank 0)."""
    world, rank = distributed.world_size(), distributed.rank()
    main = rank == 0
    plan = data.plan_batches(cfg, world)
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    resume_from = checkpoint.resolve(cfg.resume, ckpt_root)

    # ---------------------------------------------------------------- data, model, engine
    task = get_task(cfg.task)(cfg)
    train_ds, eval_ds = task.datasets()
    pin = device.type == "cuda"
    loader = data.train_loader(train_ds, plan, rank, cfg.seed, cfg.data.num_workers, pin)
    eval_dl = data.eval_loader(eval_ds, cfg.data.eval_batch_size, world, rank, cfg.data.num_workers)
    per_epoch = data.steps_per_epoch(loader, plan.accum)
    if per_epoch == 0:
        raise ConfigError("data.global_batch_size", plan.global_batch,
                          f"larger than the training set ({len(train_ds)} samples); lower it")
    total_steps = cfg.train.max_steps or cfg.train.epochs * per_epoch
    if cfg.optim.warmup_epochs > 0:
        cfg.optim.warmup_steps = round(cfg.optim.warmup_epochs * per_epoch)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and world size
    model = task.build_model()
    if cfg.model.sync_bn and world > 1:
        model = convert_sync_batchnorm(model, device)
    engine = build_engine(cfg, model, device, plan, total_steps)
    seed_everything(cfg.seed + rank)  # per-rank streams for dropout / augmentation

    state = TrainState()
    if resume_from is not None:
        client = engine.load(resume_from)
        state = TrainState(**client["trainer"])
        checkpoint.set_rng_state(client["rng"][rank] if rank < len(client["rng"]) else client["rng"][0])
    elif main and ckpt_root.exists():
        removed = checkpoint.clear(ckpt_root)
        if removed:
            log.warning("fresh start: removed %d checkpoint(s) of an earlier run in %s (resume=auto continues one)",
                        removed, ckpt_root)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        config.dump_yaml(cfg, out_dir / "config.yaml")

    # ---------------------------------------------------------------- tracking
    tags = run_tags(cfg, env, plan, engine.peak_lr, engine)
    tracker: tracking.NullTracker = tracking.NullTracker()
    if main:
        params = config.flatten(config.to_dict(cfg))
        tracker = tracking.start(cfg, params, tags, run_id=state.run_id or None)
        if tracker.run_id:
            state.run_id = tracker.run_id
    state.run_id = distributed.broadcast_object(state.run_id)

    progress = Progress(total_steps, state.step, main)
    progress.write(f"dtrain: {cfg.recipe} | task {cfg.task} | {engine.name} x{world} ({distributed.backend()}, "
                   f"{device.type}) | global batch {plan.global_batch} = {world} ranks x {plan.per_rank} x "
                   f"{plan.accum} accum | peak lr {engine.peak_lr:.6g} ({cfg.optim.scale_rule} rule from "
                   f"{cfg.optim.lr:g} @ {cfg.optim.base_batch_size}, {cfg.optim.warmup_steps} warmup steps) | "
                   f"{total_steps} steps" + (f" | resumed at step {state.step}" if resume_from else "")
                   + (f" | mlflow run {state.run_id}" if state.run_id else ""))

    status = "FAILED"
    try:
        summary = _loop(cfg, task, engine, loader, eval_dl, device, plan, per_epoch, total_steps, state,
                        ckpt_root, tracker, progress)
        if summary is None:  # train.stop_at_step: checkpointed, to be resumed
            progress.write(f"stopped after step {state.step} of {total_steps} (train.stop_at_step); "
                           f"resume=auto continues from {ckpt_root}")
            tracker.set_tags({"dtrain.stopped_at_step": state.step})
            status = "KILLED"
            return {}
        if main:
            summary["run_id"] = state.run_id
            _write_outputs(cfg, task, engine, summary, out_dir, tracker)
        elif engine.name == "deepspeed":
            engine.consolidated_state_dict()  # ZeRO-3 gathers are collective
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        progress.close()
        tracker.finish(status)


def _loop(cfg, task, engine, loader, eval_dl, device, plan, per_epoch, total_steps, state: TrainState,
          ckpt_root, tracker, progress) -> dict[str, Any] | None:
    log_every = cfg.tracking.log_every
    window_loss = torch.zeros((), device=device, dtype=torch.float64)
    window_steps = 0
    bad_steps = 0
    last_eval: dict[str, float] = {}
    last_eval_step = -1
    final_loss = float("nan")
    steady_t, steady_samples, steady_from = 0.0, 0, state.step + min(5, max(0, total_steps - state.step - 1))
    t_window = time.perf_counter()
    samples_window = 0

    def run_eval() -> None:
        nonlocal last_eval, last_eval_step, t_window
        t0 = time.perf_counter()
        last_eval = evaluate(task, engine, eval_dl, device)
        last_eval_step = state.step
        tracker.log_metrics({f"eval/{k}": v for k, v in last_eval.items()} | {"train/samples_seen": state.samples_seen},
                            state.step)
        progress.write(f"eval @ step {state.step}: " + " ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
        t_window += time.perf_counter() - t0  # evaluation is not training time

    def save_checkpoint() -> None:
        nonlocal t_window
        t0 = time.perf_counter()
        client = {"trainer": asdict(state), "rng": checkpoint.gather_rng_states(), "task": task.extra_state()}
        checkpoint.save(ckpt_root, state.step, engine, client, cfg.checkpoint.keep)
        t_window += time.perf_counter() - t0

    def finished() -> bool:
        return state.step >= total_steps or 0 < cfg.train.stop_at_step <= state.step

    sampler = loader.sampler
    while not finished():
        sampler.set_epoch(state.epoch)
        sampler.start_index = state.batch_in_epoch * plan.per_rank
        batches = iter(loader)
        for _ in range(state.batch_in_epoch // plan.accum, per_epoch):
            micro = [data.move(next(batches), device) for _ in range(plan.accum)]
            out = train_step(engine, task, micro)

            state.step += 1
            state.batch_in_epoch += plan.accum
            state.samples_seen += plan.global_batch
            samples_window += plan.global_batch
            window_loss += out.loss
            window_steps += 1
            if math.isnan(state.initial_loss):
                state.initial_loss = float(distributed.all_reduce_mean(out.loss.detach().clone().double()))
            bad_steps = 0 if out.stepped else bad_steps + 1
            if bad_steps >= cfg.train.max_nonfinite_steps:
                raise TrainingError(f"gradient norm non-finite for {bad_steps} consecutive steps at step {state.step} "
                                    "(lower optim.lr, set optim.clip_grad_norm, or use precision=bf16)")

            if state.step % log_every == 0 or state.step == total_steps:
                mean_loss = float(distributed.all_reduce_mean(window_loss) / window_steps)
                now = time.perf_counter()
                rate = samples_window / max(now - t_window, 1e-9)
                state.train_time_s += now - t_window
                metrics = {"train/loss": mean_loss, "train/lr": engine.lr, "train/grad_norm": float(out.grad_norm),
                           "train/samples_per_s": rate, "train/samples_seen": state.samples_seen,
                           "train/epoch": state.epoch + state.batch_in_epoch / (per_epoch * plan.accum)}
                metrics.update(task.train_metrics(metrics))
                tracker.log_metrics(metrics, state.step)
                progress.update(state.step, total_steps, metrics,
                                (total_steps - state.step) * plan.global_batch / max(rate, 1e-9))
                final_loss = mean_loss
                window_loss.zero_()
                window_steps, samples_window, t_window = 0, 0, time.perf_counter()
            if state.step == steady_from:
                steady_t, steady_samples = state.train_time_s + (time.perf_counter() - t_window), state.samples_seen

            if cfg.train.eval_every_steps and state.step % cfg.train.eval_every_steps == 0:
                run_eval()
            if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0 and state.step < total_steps:
                save_checkpoint()
            if finished():
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
            if not cfg.train.eval_every_steps and state.step < total_steps:
                run_eval()

    if state.step < total_steps:  # stopped early on purpose
        save_checkpoint()
        return None
    if last_eval_step != state.step:
        run_eval()
    save_checkpoint()
    elapsed = state.train_time_s - steady_t
    return {
        "steps": state.step, "samples_seen": state.samples_seen, "world_size": plan.world_size,
        "global_batch_size": plan.global_batch, "per_rank_batch_size": plan.per_rank, "grad_accum_steps": plan.accum,
        "lr": engine.peak_lr, "scale_rule": cfg.optim.scale_rule, "engine": engine.name, "precision": cfg.precision,
        "initial_loss": state.initial_loss, "final_loss": final_loss, "eval": last_eval,
        "throughput": (state.samples_seen - steady_samples) / elapsed if elapsed > 0 else None,
        "train_time_s": state.train_time_s, "epochs": state.epoch + state.batch_in_epoch / (per_epoch * plan.accum),
    } | task.summary_extras()


def _write_outputs(cfg: Config, task: Task, engine, summary: dict[str, Any], out_dir: Path, tracker) -> None:
    model_path = out_dir / "model.pt"
    checkpoint.atomic_save(engine.consolidated_state_dict(), model_path)
    summary_path = out_dir / "summary.json"
    tmp = summary_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    os.replace(tmp, summary_path)
    tracker.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and v is not None
                         and k in ("throughput", "train_time_s", "initial_loss", "final_loss")}, summary["steps"])
    for path in [out_dir / "config.yaml", summary_path, *task.write_artifacts(out_dir)]:
        tracker.log_artifact(path)
    if cfg.tracking.log_model:
        tracker.log_artifact(model_path)
