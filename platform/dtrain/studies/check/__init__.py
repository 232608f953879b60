"""`dtrain check RECIPE`: the sanity checks practitioners run by hand before a long run.

Each check returns results named `check` or `check/part`, each PASS / WARN / FAIL / SKIP
with the number behind it. The report is printed, written to `output_dir/check.json`
(plots under `output_dir/check/`) and logged to MLflow as a run of its own; the command
exits 1 when any check FAILs (so CI can gate on it), 0 otherwise.

| check | module | what it shows |
|---|---|---|
| `init_loss` | `model` | the loss at initialisation against a correct init's (ln C, ln vocab) |
| `overfit_batch` | `model` | the model can drive the loss of one small batch to near zero |
| `input_independent` | `model` | zeroed inputs train to a worse loss than real ones |
| `batch_independence`, `causal` | `model` | no sample's output depends on another's input; no position on a later one |
| `gradcheck` | `grads` | the platform's own differentiable pieces against finite differences (float64) |
| `lr_range` | `lr_range` | loss under an exponentially growing LR; a suggested range against the recipe's |
| `data` | `data` | class balance, train/test duplicates, inputs as the model sees them |
| `distributed` | `dist` | ranks see different samples, start equal, and get the mean of the local gradients |
| `invariance` | `invariance` | the first steps at world size 1 and N agree; if not, the step, module and cause |

The checks run in fp32 on fresh models seeded like training. `distributed` runs on every
rank; the others on rank 0 while the rest wait. `invariance` runs the recipe itself, twice: it
is asked for alone (`--only invariance --nproc-per-node N`) and starts its N ranks itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch

from dtrain import tracking
from dtrain.config import Config
from dtrain.config.recipe import flatten, to_dict
from dtrain.errors import ConfigError
from dtrain.runtime import distributed
from dtrain.runtime.files import atomic_write, first_line
from dtrain.studies.check import invariance
from dtrain.studies.check.context import VERDICTS, Context, Result
from dtrain.studies.check.data import check_data
from dtrain.studies.check.dist import check_distributed
from dtrain.studies.check.grads import check_gradients
from dtrain.studies.check.lr_range import check_lr_range
from dtrain.studies.check.model import (
    check_batch_independence,
    check_init_loss,
    check_input_independent,
    check_overfit_batch,
)

__all__ = ["CHECKS", "NAMES", "Context", "Result", "run"]

log = logging.getLogger("dtrain")

Check = Callable[[Context], list[Result]]
CHECKS: dict[str, tuple[Check, bool]] = {
    # name: (function, collective: run on every rank)
    "init_loss": (check_init_loss, False),
    "overfit_batch": (check_overfit_batch, False),
    "input_independent": (check_input_independent, False),
    "batch_independence": (check_batch_independence, False),  # also reports `causal`
    "gradcheck": (check_gradients, False),
    "lr_range": (check_lr_range, False),
    "data": (check_data, False),
    "distributed": (check_distributed, True),
}
NAMES = (*CHECKS, "causal", "invariance")


def select(only: str) -> list[str]:
    """`--only a,b` -> the checks to run, in the table's order."""
    if not only:
        return list(CHECKS)
    asked = [x.strip() for x in only.split(",") if x.strip()]
    unknown = [x for x in asked if x not in NAMES]
    if unknown or not asked:
        raise ConfigError("--only", only, f"names checks, comma-separated, of: {', '.join(NAMES)}")
    if "invariance" in asked and len(asked) > 1:
        raise ConfigError(
            "--only", only, "invariance runs the recipe at two world sizes: ask for it alone (--only invariance)"
        )
    if asked == ["invariance"]:
        return asked
    wanted = {"batch_independence" if x == "causal" else x for x in asked}
    return [name for name in CHECKS if name in wanted]


def select_quietly(only: str) -> list[str]:
    """`select`, or [] for names it refuses (the caller's validation says why, in one line)."""
    try:
        return select(only)
    except ConfigError:
        return []


def run_one(name: str, ctx: Context) -> list[Result]:
    """A check's results; a check that raises is a FAIL that names the exception (a model or
    task that crashes under a check crashes in training too)."""
    fn, collective = CHECKS[name]
    if not collective and not distributed.is_main():
        return []
    try:
        return fn(ctx)
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as e:
        return [Result(name, "FAIL", None, "runs", f"raised {type(e).__name__}: {first_line(e)}")]


def run(cfg: Config, device: torch.device, only: str = "") -> int:
    """Every selected check on this rank; rank 0 reports. Returns the exit code (1 on a FAIL)."""
    names = select(only)
    ctx = Context.build(cfg, device)
    results: list[Result] = []
    for name in names:
        results += run_one(name, ctx)
        distributed.barrier()  # the other ranks wait for rank 0's local checks here
    if distributed.is_main():
        finish(cfg, results, ctx.out_dir)
    return int(distributed.broadcast_object(exit_code(results)))  # every rank exits alike


def run_invariance(cfg: Config, device: torch.device, recipe: str, overrides: list[str], nproc: int) -> int:
    """`--only invariance` in this (plain) process: it starts the N-rank run itself."""
    results, details = invariance.run(cfg, device, recipe, overrides, nproc)
    out_dir = Path(cfg.output_dir)
    if details:
        out_dir.joinpath("check").mkdir(parents=True, exist_ok=True)
        invariance.plot(details, out_dir / "check" / "invariance.png")
    finish(cfg, results, out_dir, {"invariance": details} if details else {}, invariance.module_table(details))
    return exit_code(results)


def exit_code(results: list[Result]) -> int:
    return 1 if any(r.verdict == "FAIL" for r in results) else 0


def finish(
    cfg: Config, results: list[Result], out_dir: Path, extra: dict[str, object] | None = None, notes: str = ""
) -> None:
    """Print the report (and `notes`), write check.json, log the MLflow run."""
    print(report(results) + (f"\n{notes}" if notes else ""), flush=True)
    write(results, out_dir, extra or {})
    log_to_mlflow(cfg, results, out_dir)


def report(results: list[Result]) -> str:
    rows = [(r.name, r.verdict, r.value_text(), r.expected, r.detail) for r in results]
    widths = [max(len(row[i]) for row in [("check", "verdict", "value", "expected", "")] + rows) for i in range(4)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4]

    counts = {v: sum(r.verdict == v for r in results) for v in VERDICTS}
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    return "\n".join([line(("check", "verdict", "value", "expected", "detail")), *map(line, rows), summary])


def write(results: list[Result], out_dir: Path, extra: dict[str, object]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"checks": [r.as_dict() for r in results], **extra}, indent=2) + "\n"
    atomic_write(out_dir / "check.json", lambda tmp: tmp.write_text(text))


def log_to_mlflow(cfg: Config, results: list[Result], out_dir: Path) -> None:
    """A run of its own (tag dtrain.kind=check) in the experiment `<experiment>-checks`, beside
    and not among the training runs: named with its verdict (`cnn_digits-check FAIL:overfit_batch`),
    FAILED in the status column when a check failed; one metric per numeric result, one tag per
    verdict, check.json and the plots as artifacts."""
    failed = [r.name for r in results if r.verdict == "FAIL"]
    tags = {
        "dtrain.kind": "check",
        "dtrain.config.recipe": cfg.recipe,
        "dtrain.task": cfg.task,
        "dtrain.check_failed": bool(failed),
    }
    tags |= {f"check.{r.name}": r.verdict for r in results}
    cfg.tracking.experiment = f"{cfg.tracking.experiment}-checks"
    if cfg.tracking.run_name == "":
        cfg.tracking.run_name = f"{cfg.recipe}-check " + (f"FAIL:{','.join(failed)}" if failed else "PASS")
    tracker = tracking.start(cfg, flatten(to_dict(cfg)), tags, run_id=None)
    status = "FAILED"  # never left RUNNING
    try:
        tracker.log_metrics({f"check/{r.name}": r.value for r in results if r.value is not None}, 0)
        tracker.log_artifact(out_dir / "check.json")
        for path in sorted((out_dir / "check").glob("*")):
            if path.is_file():  # the plots; not invariance's per-rank records (megabytes, kept on disk)
                tracker.log_artifact(path, "check")
        status = "FAILED" if failed else "FINISHED"
    finally:
        tracker.finish(status)
