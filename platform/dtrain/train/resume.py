"""How a job continues: a fresh start never deletes an earlier run's checkpoints unless told
to; `resume` loads a checkpoint into the engines, the features, the task and the `TrainState`
(falling back past broken ones under `resume=auto`), and refuses in one line what cannot
continue (another global batch, ZeRO state on another world size)."""

from __future__ import annotations

import glob
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from dtrain import checkpoint
from dtrain.config import Config
from dtrain.engines import engine_class
from dtrain.errors import CheckpointError, ConfigError, ResumeRefused
from dtrain.protocols import BaseTask, Checkpointed, Engine
from dtrain.runtime import distributed, files
from dtrain.train.state import TrainState, seed_everything

log = logging.getLogger("dtrain")


def refuse_fresh_start_over(cfg: Config, found: list[Path]) -> None:
    """A fresh start (no `resume`) in an output_dir that holds checkpoints (`found`, newest
    first) is refused in one line unless `checkpoint.overwrite` says to start over: before
    launch, and again on the ranks."""
    if found and not cfg.resume and not cfg.checkpoint.overwrite:
        raise ConfigError("output_dir", cfg.output_dir, f"holds checkpoints of an earlier run (newest "
                          f"{found[0].name}); continue it with resume=auto, or start over with another output_dir "
                          "or checkpoint.overwrite=true")  # fmt: skip


def default_folder(cfg: Config) -> str:
    """Where a run started by `dtrain train` writes when its command line names no output_dir
    (the recipe's, or `runs/<recipe>`). A fresh start takes the first of that folder, `<folder>-2`,
    `-3`, ... that holds no earlier run, so a second `dtrain train recipe.yaml` (on another world
    size, say) never meets the first one's checkpoints or overwrites its model; `resume=auto`
    continues the newest of them that holds checkpoints. An output_dir named on the command line
    is kept as it is (and an earlier run in it refused, `refuse_fresh_start_over`)."""
    base = Path(cfg.output_dir)
    if cfg.resume == "auto":
        held = [f for f in _numbered(base) if checkpoint.candidates(f / "checkpoints")]
        return str(held[-1]) if held else cfg.output_dir
    if cfg.resume or cfg.checkpoint.overwrite:
        return cfg.output_dir
    folder, n = base, 1
    while _holds_run(folder):
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return str(folder)


def place(cfg: Config, overrides: Sequence[str]) -> bool:
    """The run's folder, settled in the one process that starts the job, before any rank: unless
    the command line names it (`output_dir=...` in `overrides`), the recipe's folder or, when
    that holds an earlier run, the next free `<folder>-N` (`default_folder`), set in `cfg`; a
    folder named on the command line that holds an earlier run's checkpoints is refused here,
    not on the ranks. True when the run goes elsewhere than `cfg.output_dir` said."""
    if not any(o.partition("=")[0].strip() == "output_dir" for o in overrides):
        folder = default_folder(cfg)
        if folder != cfg.output_dir:
            if cfg.resume:
                log.warning("resume=auto: continuing %s, the newest of %s-N", folder, cfg.output_dir)
            else:
                log.warning("%s holds an earlier run; this one writes to %s", cfg.output_dir, folder)
            cfg.output_dir = folder
            return True
    if not cfg.resume:
        refuse_fresh_start_over(cfg, checkpoint.candidates(Path(cfg.output_dir) / "checkpoints"))
    return False


def _numbered(base: Path) -> list[Path]:
    """`base`, `base-2`, `base-3`, ... as they exist, oldest first."""
    suffixes = (p.name[len(base.name) + 1 :] for p in base.parent.glob(f"{glob.escape(base.name)}-*") if p.is_dir())
    numbers = sorted(int(s) for s in suffixes if s.isdigit() and int(s) >= 2)
    return ([base] if base.is_dir() else []) + [base.with_name(f"{base.name}-{n}") for n in numbers]


# This torchrun job's mark in output_dir (its rendezvous id and MLflow run), kept until it finishes.
JOB_MARK = ".torchrun_job.json"


def _job_id() -> str:
    """This torchrun job's rendezvous id; "" for torchrun's default id "none", which names no
    job, and outside torchrun."""
    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return "" if job == "none" else job


def _this_jobs_mark(out_dir: Path) -> dict[str, Any] | None:
    """What an earlier attempt of this same torchrun job (same rendezvous id) left in `out_dir`,
    None if none."""
    job = _job_id()
    if not job:
        return None
    try:
        saved = json.loads((out_dir / JOB_MARK).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.get("job") == job else None


def continues_this_job(out_dir: Path) -> bool:
    """True when an earlier attempt of this torchrun job started in `out_dir` and did not finish:
    this attempt continues it (`resume=auto`). torchrun counts a restart after a failure
    (TORCHELASTIC_RESTART_COUNT) but not one after a host joins or returns, which restarts every
    rank as attempt 0 again; nor does a pod restarted by its controller count one."""
    return _this_jobs_mark(out_dir) is not None


def earlier_attempt_run(out_dir: Path) -> str:
    """The MLflow run an earlier attempt of this same torchrun job opened in `out_dir`, "" if
    none: an attempt can end between opening its run and writing a checkpoint; the next attempt
    continues that run, and the job stays one run."""
    return str((_this_jobs_mark(out_dir) or {}).get("run_id", ""))


def mark_job(out_dir: Path, run_id: str) -> None:
    """Rank 0, before the first checkpoint: this job's id (and MLflow run, if any), which its
    later attempts continue."""
    job = _job_id()
    if job:
        out_dir.mkdir(parents=True, exist_ok=True)
        files.atomic_write(out_dir / JOB_MARK, lambda p: p.write_text(json.dumps({"job": job, "run_id": run_id})))


def _holds_run(folder: Path) -> bool:
    return bool(checkpoint.candidates(folder / "checkpoints")) or any(
        (folder / name).exists() for name in ("summary.json", "model.pt", "model.safetensors")
    )


def refuse_to_overwrite(cfg: Config, ckpt_root: Path) -> None:
    """A fresh start never deletes an earlier run's checkpoints unless told to."""
    found: list[Path] = distributed.broadcast_object(checkpoint.candidates(ckpt_root))  # rank 0's listing
    if cfg.resume or not found:
        return
    refuse_fresh_start_over(cfg, found)
    distributed.barrier()  # every rank has looked before rank 0 removes them
    if distributed.is_main():
        removed = checkpoint.clear(ckpt_root)
        log.warning("checkpoint.overwrite=true: removed %d checkpoint(s) of an earlier run in %s", removed, ckpt_root)
    distributed.barrier()


def resume(
    cfg: Config,
    task: BaseTask,
    engines: dict[str, Engine],
    parts: dict[str, Checkpointed],
    state: TrainState,
    ckpt_root: Path,
) -> tuple[Path, dict[str, Any]] | None:
    """Load the checkpoint `resume` names into the engines, the features' folders (`parts`),
    the task and `state`; returns its folder and client state (the features' states are in
    it). Collective."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        found, pointer = distributed.broadcast_object((checkpoint.candidates(ckpt_root), checkpoint.named(ckpt_root)))
        if not found and pointer:  # `latest` names a checkpoint that is gone: never start over silently
            raise CheckpointError(
                f"resume=auto: {ckpt_root / checkpoint.LATEST} names {pointer}, which is missing, "
                "and no other checkpoint is there; restore it, or start over with another "
                "output_dir"
            )
        if not found:
            return None
    world = distributed.world_size()

    def validate(client: dict[str, Any]) -> None:
        saved = TrainState.saved(client["trainer"])
        saved_world = saved.world_size or len(client["rng"])
        if saved.global_batch and saved.global_batch != state.global_batch:
            raise ResumeRefused(
                f"data.global_batch_size={state.global_batch}: the checkpoint was trained with {saved.global_batch}, "
                "the batch its schedule, data position and step count are in; resume with it (on fewer ranks, "
                "raise data.grad_accum_steps to keep it)"
            )
        if saved.grad_accum and saved.grad_accum != state.grad_accum:
            refuse_or_warn_accumulation(cfg, engines, saved.grad_accum, state.grad_accum)
        engine_class(cfg.engine).check_resume(saved_world, world)
        refuse_changed_optimizer(cfg, client.get("recipe", {}))
        task.load_extra_state(client.get("task", {}))

    try:
        if cfg.resume == "auto":
            folder, client = checkpoint.load_newest(ckpt_root, {**engines, **parts}, validate)
        else:
            folder = _chosen_by_rank0(cfg.resume, ckpt_root)
            client = checkpoint.load(folder, {**engines, **parts}, validate)
    except CheckpointError as e:
        raise type(e)(str(e) if str(e).startswith("resume") else f"resume: {e}") from None
    _continue(cfg, task, state, client, folder, ckpt_root)
    return folder, client


def refuse_or_warn_accumulation(cfg: Config, engines: dict[str, Engine], saved: int, now: int) -> None:
    """Another accumulation at the same global batch (fewer ranks, more micro-batches each):
    every step averages the gradient of the same samples, so DDP and FSDP2 continue the same
    run. BatchNorm then normalises over other micro-batches (said, not refused); DeepSpeed keeps
    its own accumulation state, so it resumes with the one it saved."""
    if cfg.engine == "deepspeed":
        raise ResumeRefused(
            f"data.grad_accum_steps={now}: the DeepSpeed checkpoint was trained with {saved}; resume with it "
            "(engine=ddp and engine=fsdp resume with another accumulation at the same global batch)"
        )
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for e in engines.values() for m in e.module.modules()):
        log.warning(
            "resume: data.grad_accum_steps %d -> %d at the same global batch: BatchNorm statistics are now "
            "over other micro-batches (close to the straight run, not equal to it)",
            saved,
            now,
        )


def _continue(
    cfg: Config, task: BaseTask, state: TrainState, client: dict[str, Any], folder: Path, ckpt_root: Path
) -> None:
    """`state` and this rank's random streams from a loaded checkpoint's client state."""
    world, rank = distributed.world_size(), distributed.rank()
    saved = TrainState.saved(client["trainer"])
    for key in ("step", "epoch", "batch_in_epoch", "samples_seen", "initial_loss", "run_id", "train_time_s"):
        setattr(state, key, getattr(saved, key))
    if saved.grad_accum and saved.grad_accum != state.grad_accum:
        # The epoch's position in loader batches per rank: the same samples (the same global
        # steps) in the new accumulation's micro-batches.
        state.batch_in_epoch = (
            saved.batch_in_epoch
            // task.micro_batches_per_step(saved.grad_accum)
            * task.micro_batches_per_step(state.grad_accum)
        )
    if folder.parent.resolve() != ckpt_root.resolve():
        # Another output folder is another run: its own MLflow run, tagged with where it came from
        # (reopening the old one would mix two folders' histories and params).
        state.resumed_from_run, state.run_id = saved.run_id, ""
    if len(client["rng"]) == world:
        checkpoint.set_rng_state(client["rng"][rank])
    else:  # another world size: fresh per-rank streams, derived from (seed, rank, step)
        log.warning(
            "resume: the checkpoint was written by %d rank(s), this job has %d; per-rank random streams are re-derived",
            len(client["rng"]),
            world,
        )
        seed_everything(hash((cfg.seed, rank, state.step)) % 2**62)


def _chosen_by_rank0(resume: str, ckpt_root: Path) -> Path:
    """The folder an explicit `resume` names, as rank 0 sees it (every rank loads that one)."""
    try:
        chosen: Path | str = checkpoint.resolve(resume, ckpt_root) if distributed.is_main() else ""
    except CheckpointError as e:
        chosen = str(e)
    chosen = distributed.broadcast_object(chosen)
    if isinstance(chosen, str):
        raise CheckpointError(chosen)
    return chosen


# Keys whose values live in the optimizer's and the schedule's checkpointed state: a resumed run
# would silently train on the checkpoint's. Clipping and L1 are read from the recipe each step.
_APPLIED_EACH_STEP = ("optim.clip_grad_norm", "optim.clip_grad_value", "optim.l1")


def refuse_changed_optimizer(cfg: Config, saved_recipe: dict[str, Any]) -> None:
    """An `optim.*` value that differs from the checkpoint's is refused in one line (what was
    stated must be what runs); every other key applies as the recipe states it."""
    from dtrain.config import recipe

    now = recipe.flatten(recipe.to_dict(cfg))
    changed = [
        (k, v, saved_recipe[k])
        for k, v in now.items()
        if k.startswith("optim.")
        and k not in _APPLIED_EACH_STEP
        and k in saved_recipe
        and str(v) != str(saved_recipe[k])
    ]
    if changed:
        key, value, was = changed[0]
        more = f" (and {', '.join(k for k, _, _ in changed[1:])})" if changed[1:] else ""
        raise ResumeRefused(
            f"{key}={value}{more}: the checkpoint was trained with {key}={was}, and its optimizer and schedule "
            f"state would keep it; resume with {key}={was}, or start a new run from these weights with "
            "model.init_from=<checkpoint run's output_dir>"
        )
