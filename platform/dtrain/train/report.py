"""What a run reports about itself: the MLflow tags of its facts, the start line (world,
batch split, the LR each optimizer really gets), and at the end model.pt, summary.json and
the artifacts logged to MLflow."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import resource
from pathlib import Path
from typing import Any

import torch

import dtrain
from dtrain import checkpoint, data, tracking
from dtrain.runtime import distributed
from dtrain.checkpoint import safeload
from dtrain.config import Config
from dtrain.runtime.files import atomic_write
from dtrain.protocols import Engine, LRInfo, Task

log = logging.getLogger("dtrain")


def run_tags(cfg: Config, env: distributed.DistEnv, plan: data.BatchPlan, engines: dict[str, Engine]) -> dict[str, Any]:
    try:  # the version only: importing deepspeed costs seconds and probes accelerators
        ds_version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        ds_version = "not installed"
    first = next(iter(engines.values()))
    tags = {
        "dtrain.world_size": plan.world_size, "dtrain.nodes": env.num_nodes, "dtrain.backend": distributed.backend(),
        "dtrain.launcher": env.launcher, "dtrain.engine": first.name, "dtrain.precision": cfg.precision,
        "dtrain.global_batch": plan.global_batch, "dtrain.per_rank_batch": plan.per_rank,
        "dtrain.grad_accum": plan.accum, "dtrain.scaled_lr": f"{first.lr_info.peak:.6g}",
        "dtrain.scale_rule": first.lr_info.rule, "dtrain.host": distributed.hostname(), "dtrain.config.recipe": cfg.recipe,
        "dtrain.task": cfg.task, "dtrain.version": dtrain.__version__, "dtrain.torch": torch.__version__,
        "dtrain.deepspeed": ds_version, "dtrain.python": platform.python_version(),
        "dtrain.device": str(first.device.type), "dtrain.run_label": f"{cfg.recipe}-{plan.world_size}x",
    }
    if len(engines) > 1:
        tags.update({f"dtrain.scaled_lr_{n}": f"{e.lr_info.peak:.6g}" for n, e in engines.items()})
    commit = tracking.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _lr_origin(info: LRInfo, plan: data.BatchPlan) -> str:
    if info.base_batch == plan.global_batch or info.rule == "none":
        return "as stated"
    return f"{info.rule} rule from {info.base:g} @ {info.base_batch}"


def lr_warnings(engines: dict[str, Engine], plan: data.BatchPlan) -> list[str]:
    """A line for each optimizer whose LR the scaling rule moved more than 2x from the stated
    one: a rule from a base batch far from the run's is the usual cause of a run that will
    not learn (or diverges), and the start line alone is easy to miss."""
    out = []
    for name, e in engines.items():
        i, key = e.lr_info, "optim" if name == "model" else f"optim_{name[0]}"
        if i.base > 0 and not 0.5 <= i.peak / i.base <= 2:
            out.append(f"warning: {key}.lr={i.base:g} is stated for a global batch of {i.base_batch} "
                       f"({key}.base_batch_size); this run's {plan.global_batch} gets {i.peak:.3g} by the {i.rule} "
                       f"rule. If {i.base:g} is meant for this batch, leave {key}.base_batch_size unset or set "
                       f"{key}.scale_rule=none")
    return out


def describe(cfg: Config, plan: data.BatchPlan, engines: dict[str, Engine], total_steps: int,
             fp32_matmuls: str | None = None) -> str:
    """The start line: world, batch split and the LR each optimizer really gets."""
    first = next(iter(engines.values()))
    lrs = " | ".join(f"{'' if n == 'model' else n + ' '}peak lr {e.lr_info.peak:.6g} ({_lr_origin(e.lr_info, plan)}, "
                     f"{e.lr_info.warmup_steps} warmup steps)" for n, e in engines.items())
    return (f"dtrain: {cfg.recipe} | task {cfg.task} | {first.name} x{plan.world_size} ({distributed.backend()}, "
            f"{first.device.type}) | global batch {plan.global_batch} = {plan.world_size} rank{'s' if plan.world_size > 1 else ''} x {plan.per_rank} x "
            f"{plan.accum} accum | {lrs} | {total_steps} steps"
            + (f" | fp32 matmuls {fp32_matmuls}" if fp32_matmuls else "") + (" | compiled" if cfg.compile else ""))


# --------------------------------------------------------------------------- fit


def peak_memory_mb(device: torch.device) -> float:
    """The largest rank's peak: CUDA memory allocated by tensors, or on a CPU the process's peak RSS."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return float(distributed.all_reduce_max(torch.tensor(float(peak), device=device))) / 2**20


def write_outputs(cfg: Config, task: Task, engines: dict[str, Engine], weights: dict[str, torch.Tensor],
                   summary: dict[str, Any], out_dir: Path, tracker: tracking.NullTracker) -> None:
    model_path = out_dir / "model.pt"
    checkpoint.atomic_save(weights, model_path)
    safeload.save_weights(weights, out_dir / "model.safetensors")  # the file to share: loading it runs no code
    written = [out_dir / "config.yaml"]
    try:
        preprocessing = task.preprocessing()
    except (AttributeError, KeyError, TypeError) as e:  # a subclass whose datasets() set other attributes
        log.warning("%s not written (task.preprocessing(): %s): dtrain.load needs it; the model is saved",
                    safeload.PREPROCESSING, e)
        preprocessing = {}
    if preprocessing:  # what `dtrain.load` needs besides the weights (input statistics, a vocabulary)
        written.append(out_dir / safeload.PREPROCESSING)
        safeload.save_weights(preprocessing, written[-1])
    summary_path = out_dir / "summary.json"
    atomic_write(summary_path, lambda p: p.write_text(json.dumps(summary, indent=2, default=float) + "\n"))
    tracker.log_metrics({k: float(summary[k]) for k in ("throughput", "train_time_s", "initial_loss", "final_loss")
                         if isinstance(summary.get(k), (int, float))}, summary["steps"])
    for path in [*written, summary_path, *task.write_artifacts(out_dir, engines)]:
        tracker.log_artifact(path)
    for path in sorted((out_dir / "profile").glob("*")):  # traces of the ranks on this machine
        tracker.log_artifact(path, "profile")
    if cfg.tracking.log_model:
        tracker.log_artifact(model_path)


def profile_lines(summary: dict[str, Any]) -> list[str]:
    """`profile.enabled`: each profiled rank's breakdown (see `dtrain.features.profile.breakdown`)."""
    return [f"profile, rank {rank} (mean ms of CPU time per recorded step; the parts overlap): "
            + " ".join(f"{k.removesuffix('_ms')} {v:.3g}" for k, v in parts.items())
            for rank, parts in (summary.get("profile") or {}).items()]


def closing_line(cfg: Config, summary: dict[str, Any], out_dir: Path) -> str:
    """The run's last line: how it ended, where its outputs are, and how to look at it."""
    metrics = " ".join(f"{k} {v:.4g}" for k, v in (summary.get("eval") or {}).items() if k != "samples")
    line = f"done: {summary['steps']} steps" + (f" | eval {metrics}" if metrics else "") + \
        f" | {out_dir} (model.safetensors, summary.json)"
    if summary.get("run_id"):
        uri = tracking.resolve_uri(cfg.tracking.uri)
        line += f" | mlflow run {summary['run_id']}"
        if uri.startswith("sqlite:///"):  # no server to open: the command that starts one on this store
            line += f"; to see it: mlflow ui --backend-store-uri {uri}"
    return line
