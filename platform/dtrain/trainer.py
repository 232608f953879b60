"""`fit`: build everything a recipe names, run the loop, evaluate, checkpoint, report.

The per-step data path lives in the task's `train_step` (for supervised tasks
`dtrain.engine.train_step`); this file is the loop around it, in the shape of
torchvision's reference `main()`: set up, resume, train, evaluate, save.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
import random
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dtrain
from dtrain import checkpoint, config, data, distributed, tracking
from dtrain.config import Config, ConfigError
from dtrain.engine import DDPEngine
from dtrain.norm import convert_sync_batchnorm
from dtrain.progress import Progress
from dtrain.tasks import ModelSpec, Task, get_task

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


def build_engines(cfg: Config, specs: dict[str, ModelSpec], device: torch.device, plan: data.BatchPlan,
                  total_steps: int) -> dict[str, Any]:
    """One engine per model; under fp16 the DDP engines share one GradScaler (one update per step)."""
    world = distributed.world_size()
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    engines = {}
    for name, spec in specs.items():
        module = spec.module
        if cfg.model.sync_bn and world > 1:
            module = convert_sync_batchnorm(module, device)
        steps = math.ceil(total_steps * spec.steps_per_step)
        if cfg.engine == "deepspeed":
            from dtrain.deepspeed_engine import DeepSpeedEngine

            engines[name] = DeepSpeedEngine(module, cfg, spec.optim, device=device, plan=plan, total_steps=steps)
        else:
            engines[name] = DDPEngine(module, spec.optim, precision=cfg.precision, device=device,
                                      global_batch=plan.global_batch, total_steps=steps,
                                      broadcast_buffers=spec.broadcast_buffers, scaler=scaler)
    return engines


def run_tags(cfg: Config, env: distributed.DistEnv, plan: data.BatchPlan, engines: dict[str, Any]) -> dict[str, Any]:
    try:  # the version only: importing deepspeed costs seconds and probes accelerators
        ds_version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        ds_version = "not installed"
    first = next(iter(engines.values()))
    tags = {
        "dtrain.world_size": plan.world_size, "dtrain.nodes": env.num_nodes, "dtrain.backend": distributed.backend(),
        "dtrain.launcher": env.launcher, "dtrain.engine": first.name, "dtrain.precision": cfg.precision,
        "dtrain.global_batch": plan.global_batch, "dtrain.per_rank_batch": plan.per_rank,
        "dtrain.grad_accum": plan.accum, "dtrain.scaled_lr": f"{first.peak_lr:.6g}",
        "dtrain.scale_rule": first.scale_rule, "dtrain.host": distributed.hostname(), "dtrain.recipe": cfg.recipe,
        "dtrain.task": cfg.task, "dtrain.version": dtrain.__version__, "dtrain.torch": torch.__version__,
        "dtrain.deepspeed": ds_version, "dtrain.python": platform.python_version(),
        "dtrain.device": str(first.device.type), "dtrain.run_label": f"{cfg.recipe}-{plan.world_size}x",
    }
    if len(engines) > 1:
        tags.update({f"dtrain.scaled_lr_{n}": f"{e.peak_lr:.6g}" for n, e in engines.items()})
    commit = tracking.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def describe(cfg: Config, plan: data.BatchPlan, engines: dict[str, Any], total_steps: int) -> str:
    """The start line: world, batch split and the LR each optimizer really gets."""
    first = next(iter(engines.values()))
    lrs = " | ".join(
        f"{'' if n == 'model' else n + ' '}peak lr {e.peak_lr:.6g} ({e.scale_rule} rule from {e.base_lr:g} @ "
        f"{e.base_batch}, {e.warmup_steps} warmup steps)" for n, e in engines.items())
    return (f"dtrain: {cfg.recipe} | task {cfg.task} | {first.name} x{plan.world_size} ({distributed.backend()}, "
            f"{first.device.type}) | global batch {plan.global_batch} = {plan.world_size} ranks x {plan.per_rank} x "
            f"{plan.accum} accum | {lrs} | {total_steps} steps")


def fit(cfg: Config, env: distributed.DistEnv, device: torch.device) -> dict[str, Any]:
    """Train `cfg` on this rank (the process group is already up). Returns the summary (rank 0)."""
    world, rank = distributed.world_size(), distributed.rank()
    main = rank == 0
    plan = data.plan_batches(cfg, world)
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    resume_from = checkpoint.resolve(cfg.resume, ckpt_root)

    # ---------------------------------------------------------------- data, models, engines
    task = get_task(cfg.task)(cfg)
    train_ds, eval_ds = task.datasets()
    loader = data.train_loader(train_ds, plan, rank, cfg.seed, cfg.data.num_workers, device.type == "cuda")
    eval_dl = data.eval_loader(eval_ds, cfg.data.eval_batch_size, world, rank, cfg.data.num_workers)
    micro = task.micro_batches_per_step(plan.accum)
    per_epoch = data.steps_per_epoch(loader, micro)
    if per_epoch == 0:
        raise ConfigError("data.global_batch_size", plan.global_batch,
                          f"larger than the training set ({len(train_ds)} samples); lower it")
    total_steps = cfg.train.max_steps or cfg.train.epochs * per_epoch

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and world size
    specs = task.models()
    for spec in specs.values():
        if spec.optim.warmup_epochs > 0:
            spec.optim.warmup_steps = round(spec.optim.warmup_epochs * per_epoch * spec.steps_per_step)
    engines = build_engines(cfg, specs, device, plan, total_steps)
    seed_everything(cfg.seed + rank)  # per-rank streams for dropout / augmentation / noise

    state = TrainState()
    if resume_from is not None:
        client = checkpoint.load(resume_from, engines)
        state = TrainState(**client["trainer"])
        task.load_extra_state(client.get("task", {}))
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
    tracker: tracking.NullTracker = tracking.NullTracker()
    if main:
        params = config.flatten(config.to_dict(cfg))
        tracker = tracking.start(cfg, params, run_tags(cfg, env, plan, engines), run_id=state.run_id or None)
        if tracker.run_id:
            state.run_id = tracker.run_id
    state.run_id = distributed.broadcast_object(state.run_id)

    progress = Progress(total_steps, state.step, main)
    progress.write(describe(cfg, plan, engines, total_steps)
                   + (f" | resumed at step {state.step}" if resume_from else "")
                   + (f" | mlflow run {state.run_id}" if state.run_id else ""))

    status = "FAILED"
    try:
        summary = _loop(cfg, task, engines, loader, eval_dl, device, plan, micro, per_epoch, total_steps, state,
                        ckpt_root, tracker, progress)
        if summary is None:  # train.stop_at_step: checkpointed, to be resumed
            progress.write(f"stopped after step {state.step} of {total_steps} (train.stop_at_step); "
                           f"resume=auto continues from {ckpt_root}")
            tracker.set_tags({"dtrain.stopped_at_step": state.step})
            status = "KILLED"
            return {}
        weights = task.final_state_dict(engines)  # collective under ZeRO-3
        if main:
            summary["run_id"] = state.run_id
            _write_outputs(cfg, task, engines, weights, summary, out_dir, tracker)
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        progress.close()
        tracker.finish(status)


def _loop(cfg, task, engines, loader, eval_dl, device, plan, micro, per_epoch, total_steps, state: TrainState,
          ckpt_root, tracker, progress) -> dict[str, Any] | None:
    """The training loop. Returns the summary, or None when stopped early by train.stop_at_step."""
    log_every = cfg.tracking.log_every
    samples_per_step = plan.per_rank * plan.world_size * micro
    first = next(iter(engines.values()))
    window: dict[str, torch.Tensor] = {}
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
        last_eval = task.evaluate(engines, eval_dl, device)
        last_eval_step = state.step
        tracker.log_metrics({f"eval/{k}": v for k, v in last_eval.items()} | {"train/samples_seen": state.samples_seen},
                            state.step)
        progress.write(f"eval @ step {state.step}: " + " ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
        t_window += time.perf_counter() - t0  # evaluation is not training time

    def save_checkpoint() -> None:
        nonlocal t_window
        t0 = time.perf_counter()
        client = {"trainer": asdict(state), "rng": checkpoint.gather_rng_states(), "task": task.extra_state()}
        checkpoint.save(ckpt_root, state.step, engines, client, cfg.checkpoint.keep)
        t_window += time.perf_counter() - t0

    def finished() -> bool:
        return state.step >= total_steps or 0 < cfg.train.stop_at_step <= state.step

    sampler = loader.sampler
    while not finished():
        sampler.set_epoch(state.epoch)
        sampler.start_index = state.batch_in_epoch * plan.per_rank
        batches = iter(loader)
        for _ in range(state.batch_in_epoch // micro, per_epoch):
            _fault_drill(state.step)
            out = task.train_step(engines, [data.move(next(batches), device) for _ in range(micro)])

            state.step += 1
            state.batch_in_epoch += micro
            state.samples_seen += samples_per_step
            samples_window += samples_per_step
            for k, v in {"loss": out.loss, **out.metrics}.items():
                window[k] = window.get(k, 0) + v.detach().double()
            window_steps += 1
            if math.isnan(state.initial_loss):
                state.initial_loss = float(distributed.all_reduce_mean(out.loss.detach().clone().double()))
            bad_steps = 0 if out.stepped else bad_steps + 1
            if bad_steps >= cfg.train.max_nonfinite_steps:
                raise TrainingError(f"gradient norm non-finite for {bad_steps} consecutive steps at step {state.step} "
                                    "(lower optim.lr, set optim.clip_grad_norm, or use precision=bf16)")

            if state.step % log_every == 0 or state.step == total_steps:
                # One all-reduce for every windowed value: the logged numbers are the ranks' mean.
                keys = sorted(window)
                means = (distributed.all_reduce_mean(torch.stack([window[k] for k in keys])) / window_steps).tolist()
                now = time.perf_counter()
                rate = samples_window / max(now - t_window, 1e-9)
                state.train_time_s += now - t_window
                metrics = {f"train/{k}": v for k, v in zip(keys, means)}
                metrics.update({"train/lr": first.lr, "train/grad_norm": float(out.grad_norm),
                                "train/samples_per_s": rate, "train/samples_seen": state.samples_seen,
                                "train/epoch": state.epoch + state.batch_in_epoch / (per_epoch * micro)})
                scaler = getattr(first, "scaler", None)
                if scaler is not None and scaler.is_enabled():  # fp16: the loss scale GradScaler settled on
                    metrics["train/loss_scale"] = scaler.get_scale()
                metrics.update(task.train_metrics(metrics))
                tracker.log_metrics(metrics, state.step)
                progress.update(state.step, total_steps, metrics,
                                (total_steps - state.step) * samples_per_step / max(rate, 1e-9))
                final_loss = metrics["train/loss"]
                window, window_steps, samples_window, t_window = {}, 0, 0, time.perf_counter()
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
    summary = {
        "steps": state.step, "samples_seen": state.samples_seen, "world_size": plan.world_size,
        "global_batch_size": plan.global_batch, "per_rank_batch_size": plan.per_rank, "grad_accum_steps": plan.accum,
        "lr": first.peak_lr, "scale_rule": first.scale_rule, "engine": first.name, "precision": cfg.precision,
        "initial_loss": state.initial_loss, "final_loss": final_loss, "eval": last_eval,
        "throughput": (state.samples_seen - steady_samples) / elapsed if elapsed > 0 else None,
        "train_time_s": state.train_time_s, "epochs": state.epoch + state.batch_in_epoch / (per_epoch * micro),
        "peak_memory_mb": peak_memory_mb(device),
    }
    return summary | task.summary_extras(summary)


def peak_memory_mb(device: torch.device) -> float:
    """The largest rank's peak: CUDA memory allocated by tensors, or on a CPU the process's peak RSS."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return float(distributed.all_reduce_max(torch.tensor(float(peak), device=device))) / 2**20


def _fault_drill(step: int) -> None:
    """DTRAIN_FAULT=hang:<rank>:<step> makes that rank stall before that step, to rehearse
    (and test) the collective timeout. Unset in normal runs."""
    spec = os.environ.get("DTRAIN_FAULT")
    if spec:
        kind, rank, at = spec.split(":")
        if kind == "hang" and int(rank) == distributed.rank() and int(at) == step:
            log.warning("DTRAIN_FAULT: rank %s hangs at step %s", rank, step)
            while True:
                time.sleep(1)


def _write_outputs(cfg: Config, task: Task, engines: dict[str, Any], weights: dict[str, torch.Tensor],
                   summary: dict[str, Any], out_dir: Path, tracker) -> None:
    model_path = out_dir / "model.pt"
    checkpoint.atomic_save(weights, model_path)
    summary_path = out_dir / "summary.json"
    tmp = summary_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    os.replace(tmp, summary_path)
    tracker.log_metrics({k: float(summary[k]) for k in ("throughput", "train_time_s", "initial_loss", "final_loss")
                         if isinstance(summary.get(k), (int, float))}, summary["steps"])
    for path in [out_dir / "config.yaml", summary_path, *task.write_artifacts(out_dir, engines)]:
        tracker.log_artifact(path)
    if cfg.tracking.log_model:
        tracker.log_artifact(model_path)
