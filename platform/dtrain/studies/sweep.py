"""`dtrain sweep-world-sizes`: the recipe trained at several world sizes (torchrun on this
machine) into one MLflow experiment, ready for `dtrain compare`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Sequence

from dtrain import data
from dtrain.config import Config
from dtrain.errors import ConfigError, Failure, WorkFailed
from dtrain.runtime import launch
from dtrain.train.config import load_config


def parse_sizes(text: str) -> list[int]:
    """`--world-sizes`: positive rank counts, e.g. "1,2,4"."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(n <= 0 for n in sizes):
        raise ConfigError("--world-sizes", text, "expected positive integers like 1,2,4")
    return sizes


def sweep(recipe: str, overrides: Sequence[str], sizes: list[int], keep: str) -> tuple[Config, list[str]]:
    """Train at each world size (every recipe validated first); (the recipe, the MLflow run ids)."""
    cfg = load_config(recipe, overrides)
    data.plan_batches(cfg, min(sizes))
    extra = {n: sweep_overrides(cfg, n, min(sizes), keep) for n in sizes}
    for n in sizes:
        data.plan_batches(load_config(recipe, [*overrides, *extra[n]]), n)
    base, run_ids = Path(cfg.output_dir), []
    for n in sizes:
        out = base / f"ws{n}"
        cmd = launch.torchrun_cmd(
            n, recipe, [*overrides, *extra[n], f"output_dir={out}", f"tracking.run_name={cfg.recipe}-{n}x"]
        )
        print(f"sweep: {n} rank(s) -> {out}", flush=True)
        if subprocess.run(cmd, env=launch.torchrun_env(nproc=n)).returncode != 0:  # nosec B603 # dtrain's own argv, no shell
            raise WorkFailed(f"sweep: the {n}-rank run failed (see above)")
        run_ids.append(json.loads((out / "summary.json").read_text()).get("run_id"))
    if not all(run_ids):
        raise Failure("sweep: tracking was off, nothing to compare (tracking.enabled=true)")
    return cfg, run_ids


def sweep_overrides(cfg: Config, n: int, base: int, keep: str) -> list[str]:
    """What `dtrain sweep-world-sizes` adds to the recipe for its n-rank run.

    keep=global (strong scaling): nothing; every run has the recipe's global batch.
    keep=per-rank (weak scaling, how a job usually grows from 1 GPU to N): the per-rank batch
    the recipe has at `base` ranks is kept, so the global batch, and the LR by the recipe's
    `optim.scale_rule`, grow n / base-fold; counts stated in steps (`train.max_steps`, evaluation
    and checkpoint intervals, `optim.warmup_steps`) shrink alike, so every run sees the same
    samples and warms up over the same ones (Goyal et al.'s setting).
    """
    if keep == "global":
        return []
    d = cfg.data
    per_rank = d.global_batch_size // (base * d.grad_accum_steps)
    out = [f"data.global_batch_size={per_rank * n * d.grad_accum_steps}"]
    if not cfg.optim.base_batch_size:  # the LR is stated for the recipe's batch: the rule scales from there
        out.append(f"optim.base_batch_size={d.global_batch_size}")
    for key, steps in (
        ("train.max_steps", cfg.train.max_steps),
        ("train.eval_every_steps", cfg.train.eval_every_steps),
        ("checkpoint.every_steps", cfg.checkpoint.every_steps),
        ("optim.warmup_steps", cfg.optim.warmup_steps),
    ):
        if isinstance(steps, int) and steps:  # (checkpoint.every_steps=auto measures its own interval)
            out.append(f"{key}={max(1, round(steps * base / n))}")
    return out
