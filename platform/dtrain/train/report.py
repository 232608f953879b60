"""What a run says about itself: the MLflow tags of its facts, the start line (world, batch
split, the LR each optimizer really gets), warnings about the LR, and the closing line."""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import resource
from pathlib import Path
from typing import Any

import torch

import dtrain
from dtrain import data, tracking
from dtrain.config import Config
from dtrain.protocols import Engine, LRInfo
from dtrain.runtime import distributed

log = logging.getLogger("dtrain")


def run_tags(cfg: Config, env: distributed.DistEnv, plan: data.BatchPlan, engines: dict[str, Engine]) -> dict[str, Any]:
    try:  # the version only: importing deepspeed costs seconds and probes accelerators
        ds_version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        ds_version = "not installed"
    first = next(iter(engines.values()))
    tags = {
        "dtrain.world_size": plan.world_size,
        "dtrain.nodes": env.num_nodes,
        "dtrain.backend": distributed.backend(),
        "dtrain.launcher": env.launcher,
        "dtrain.engine": first.name,
        "dtrain.precision": cfg.precision,
        "dtrain.global_batch": plan.global_batch,
        "dtrain.per_rank_batch": plan.per_rank,
        "dtrain.grad_accum": plan.accum,
        "dtrain.scaled_lr": f"{first.lr_info.peak:.6g}",
        "dtrain.scale_rule": first.lr_info.rule,
        "dtrain.host": distributed.hostname(),
        "dtrain.config.recipe": cfg.recipe,
        "dtrain.task": cfg.task,
        "dtrain.version": dtrain.__version__,
        "dtrain.torch": torch.__version__,
        "dtrain.deepspeed": ds_version,
        "dtrain.python": platform.python_version(),
        "dtrain.device": str(first.device.type),
        "dtrain.threads": torch.get_num_threads(),
        "dtrain.run_label": f"{cfg.recipe}-{plan.world_size}x",
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
            out.append(
                f"warning: {key}.lr={i.base:g} is stated for a global batch of {i.base_batch} "
                f"({key}.base_batch_size); this run's {plan.global_batch} gets {i.peak:.3g} by the {i.rule} "
                f"rule. If {i.base:g} is meant for this batch, leave {key}.base_batch_size unset or set "
                f"{key}.scale_rule=none"
            )
    return out


def describe(
    cfg: Config, plan: data.BatchPlan, engines: dict[str, Engine], total_steps: int, fp32_matmuls: str | None = None
) -> str:
    """The start line: world, batch split and the LR each optimizer really gets."""
    first = next(iter(engines.values()))
    lrs = " | ".join(
        f"{'' if n == 'model' else n + ' '}peak lr {e.lr_info.peak:.6g} ({_lr_origin(e.lr_info, plan)}, "
        f"{e.lr_info.warmup_steps} warmup steps)"
        for n, e in engines.items()
    )
    ranks = f"{plan.world_size} rank{'s' * (plan.world_size > 1)}"
    n = torch.get_num_threads()  # a CPU rank's speed depends on it: 1 process and N ranks are compared by it
    threads = f", {n} thread{'s' * (n > 1)}" if first.device.type == "cpu" else ""
    return (
        f"dtrain: {cfg.recipe} | task {cfg.task} | {first.name} x{plan.world_size} ({distributed.backend()}, "
        f"{first.device.type}, {cfg.precision}{threads}) | global batch {plan.global_batch} = {ranks} x "
        f"{plan.per_rank} x {plan.accum} accum "
        f"| {lrs} | {total_steps} steps"
        + (f" | fp32 matmuls {fp32_matmuls}" if fp32_matmuls else "")
        + (" | compiled" if cfg.compile else "")
    )


# --------------------------------------------------------------------------- fit


def peak_memory_mb(device: torch.device) -> float:
    """The largest rank's peak: CUDA memory allocated by tensors, or on a CPU the process's peak RSS."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return float(distributed.all_reduce_max(torch.tensor(float(peak), device=device))) / 2**20


def closing_line(cfg: Config, summary: dict[str, Any], out_dir: Path) -> str:
    """The run's last line: how it ended, where its outputs are, and how to look at it."""
    metrics = " ".join(f"{k} {v:.4g}" for k, v in (summary.get("eval") or {}).items() if k != "samples")
    line = (
        f"done: {summary['steps']} steps"
        + (f" | eval {metrics}" if metrics else "")
        + f" | {out_dir} (model.safetensors, summary.json)"
    )
    if summary.get("run_id"):
        uri = tracking.resolve_uri(cfg.tracking.uri)
        line += f" | mlflow run {summary['run_id']}"
        if uri.startswith("sqlite:///"):  # no server to open: the command that starts one on this store
            line += f"; to see it: mlflow ui --backend-store-uri {uri}"
    return line
