"""`dtrain compare`: do the N-rank runs converge like the 1-rank run? Read back from MLflow.

For the runs of an experiment (or given run ids) it prints a table, writes `comparison.png`
(train loss and the eval metric against samples seen and against wall time, one line per
run labelled by world size) and `comparison.json` (the same numbers and a verdict: is each
multi-rank run's final metric within the tolerance of the baseline's), and logs both as
artifacts of a comparison run in the same experiment.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtrain.errors import CompareError as CompareError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

KIND_TAG = "dtrain.kind"


@dataclass
class RunInfo:
    run_id: str
    run_name: str
    status: str
    world_size: int
    global_batch: int
    scaled_lr: float
    scale_rule: str
    steps: int
    samples: int
    wall_time_s: float
    samples_per_s: float
    final_train_loss: float
    final_metric: float
    start_time_ms: int = 0
    output_dir: str = ""
    """Where the run wrote its config.yaml (its `output_dir` param)."""
    time_to_target_s: float | None = None
    curves: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict, repr=False)
    """metric -> [(samples seen, seconds since start, value)]"""
    threads: int | None = None
    """Intra-op threads per rank (CPU): speeds of 1 and N ranks compare only at equal threads."""


def _history(client: MlflowClient, run: Run, key: str, global_batch: int) -> list[tuple[int, float, float]]:
    start = run.info.start_time
    hist = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
    latest: dict[int, Any] = {}
    for m in hist:  # a resumed run may re-log a step it logged before the interruption: keep the last
        latest[m.step] = m
    return [(step * global_batch, (m.timestamp - start) / 1000.0, m.value) for step, m in sorted(latest.items())]


def load_runs(client: MlflowClient, experiment: str | None, run_ids: list[str], metric: str) -> list[RunInfo]:
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        exp = client.get_experiment_by_name(experiment or "")
        if exp is None:
            raise CompareError(f"--experiment={experiment!r}: no such experiment in the tracking store")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
    out = [info for run in runs if (info := _info(client, run, metric)) is not None]
    if not out:
        raise CompareError(
            f"no dtrain runs with metric {metric!r} found" + (f" in experiment {experiment!r}" if not run_ids else "")
        )
    if not any(r.curves[metric] for r in out):  # a typo: say what the runs do report
        reported = sorted({k for run in runs for k in run.data.metrics if k.startswith(("eval", "train/"))})
        raise CompareError(
            f"--metric={metric!r}: none of the {len(out)} runs reports it; they report "
            f"{', '.join(reported) or 'no metric'}"
        )
    return sorted(out, key=lambda r: (r.world_size, r.global_batch, r.run_id))


def _info(client: MlflowClient, run: Any, metric: str) -> RunInfo | None:
    """What the comparison reads of one run (None: not a dtrain training run)."""
    tags = run.data.tags
    if tags.get(KIND_TAG) == "comparison" or "dtrain.world_size" not in tags:
        return None
    gb = int(tags["dtrain.global_batch"])
    loss, evals = _history(client, run, "train/loss", gb), _history(client, run, metric, gb)
    steps = max((s // gb for s, _, _ in loss + evals), default=0)
    end = run.info.end_time or (max((t for _, t, _ in loss + evals), default=0) * 1000 + run.info.start_time)
    wall = (end - run.info.start_time) / 1000.0
    return RunInfo(
        run_id=run.info.run_id, run_name=run.info.run_name or "", status=run.info.status,
        world_size=int(tags["dtrain.world_size"]), global_batch=gb, scaled_lr=float(tags["dtrain.scaled_lr"]),
        scale_rule=tags.get("dtrain.scale_rule", "?"), steps=steps, samples=steps * gb, wall_time_s=wall,
        samples_per_s=run.data.metrics.get("throughput", steps * gb / wall if wall > 0 else math.nan),
        final_train_loss=loss[-1][2] if loss else math.nan, final_metric=evals[-1][2] if evals else math.nan,
        start_time_ms=run.info.start_time, output_dir=run.data.params.get("output_dir", ""),
        curves={"train/loss": loss, metric: evals},
        threads=int(tags["dtrain.threads"]) if "dtrain.threads" in tags else None,
    )  # fmt: skip


def verdict(
    runs: list[RunInfo], metric: str, tolerance: float, higher_is_better: bool, target: float | None
) -> dict[str, Any]:
    finished = [r for r in runs if r.status == "FINISHED" and not math.isnan(r.final_metric)]
    if not finished:
        raise CompareError("no FINISHED run with a final value of the metric to compare")
    smallest = min(r.world_size for r in finished)
    # The baseline: the newest (latest started) finished run at the smallest world size.
    base = max((r for r in finished if r.world_size == smallest), key=lambda r: (r.start_time_ms, r.run_id))
    if target is None:
        target = base.final_metric - tolerance if higher_is_better else base.final_metric + tolerance
    for r in runs:
        reached = [t for _, t, v in r.curves.get(metric, []) if (v >= target if higher_is_better else v <= target)]
        r.time_to_target_s = reached[0] if reached else None
    checks = []
    for r in finished:
        if r is base:
            continue
        gap = r.final_metric - base.final_metric
        worse_by = -gap if higher_is_better else gap
        checks.append(
            {
                "run_id": r.run_id,
                "world_size": r.world_size,
                "global_batch": r.global_batch,
                "scale_rule": r.scale_rule,
                "final": r.final_metric,
                "gap": gap,
                "within_tolerance": worse_by <= tolerance,
                "output_dir": r.output_dir,
            }
        )
    return {
        "metric": metric,
        "higher_is_better": higher_is_better,
        "tolerance": tolerance,
        "target": target,
        "baseline": {
            "run_id": base.run_id,
            "world_size": base.world_size,
            "final": base.final_metric,
            "chosen_as": f"the newest FINISHED run at the smallest world size ({smallest})",
        },
        "checks": checks,
        "ok": all(c["within_tolerance"] for c in checks),
    }


def table(runs: list[RunInfo], metric: str) -> str:
    cols = [
        "run",
        "world",
        "threads",
        "global batch",
        "scaled lr",
        "steps",
        "samples",
        "wall s",
        "samples/s",
        "final loss",
        f"final {metric}",
        "to target s",
    ]
    rows = [
        [
            r.run_name or r.run_id[:8],
            r.world_size,
            "-" if r.threads is None else r.threads,
            r.global_batch,
            f"{r.scaled_lr:.4g}",
            r.steps,
            r.samples,
            f"{r.wall_time_s:.1f}",
            f"{r.samples_per_s:.0f}",
            f"{r.final_train_loss:.4f}",
            f"{r.final_metric:.4f}",
            "-" if r.time_to_target_s is None else f"{r.time_to_target_s:.1f}",
        ]
        for r in runs
    ]
    widths = [max(len(str(x)) for x in [c] + [row[i] for row in rows]) for i, c in enumerate(cols)]

    def line(xs: list[Any]) -> str:
        return "  ".join(str(x).rjust(w) for x, w in zip(xs, widths))

    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plot(runs: list[RunInfo], metric: str, path: Path, result: dict[str, Any] | None = None) -> None:
    """Train loss and `metric` against samples seen and wall time, one line per run (with
    markers where a run has few points), the verdict's tolerance band around the baseline's
    final value on the metric's panels, and one legend for the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for r in runs:
        label = f"{r.world_size}x (batch {r.global_batch}, lr {r.scaled_lr:.3g}, {r.scale_rule})"
        for col, key in enumerate(["train/loss", metric]):
            pts = r.curves.get(key, [])
            style = {"label": label, "marker": "o" if len(pts) <= 12 else None, "markersize": 4}
            if pts:
                axes[0][col].plot([p[0] for p in pts], [p[2] for p in pts], **style)
                axes[1][col].plot([p[1] for p in pts], [p[2] for p in pts], **style)
    for col, key in enumerate(["train/loss", metric]):
        axes[0][col].set(xlabel="samples seen", ylabel=key, title=f"{key} vs samples seen")
        axes[1][col].set(xlabel="wall time (s)", ylabel=key, title=f"{key} vs wall time")
        if key.endswith("loss"):
            axes[0][col].set_yscale("log")
            axes[1][col].set_yscale("log")
    if result is not None:  # where a run's final value must land to count as converging like the baseline
        base, tol = result["baseline"]["final"], result["tolerance"]
        low, high = (base - tol, math.inf) if result["higher_is_better"] else (-math.inf, base + tol)
        for ax in (axes[0][1], axes[1][1]):
            bottom, top = ax.get_ylim()
            ax.axhspan(
                max(low, bottom),
                min(high, top),
                color="tab:green",
                alpha=0.08,
                label=f"within tolerance {tol:g} of the baseline",
            )
            ax.set_ylim(bottom, top)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    handles, labels = axes[0][1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)) or 1, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(
    uri: str,
    experiment: str | None,
    run_ids: list[str],
    metric: str,
    output: Path,
    tolerance: float,
    target: float | None,
    log_run: bool = True,
) -> dict[str, Any]:
    from dtrain.tracking import open_client

    client = open_client(uri)
    runs = load_runs(client, experiment, run_ids, metric)
    higher = not metric.split("/")[-1].startswith(("loss", "bpc", "perplexity", "fid", "frechet"))
    result = verdict(runs, metric, tolerance, higher, target)
    output.mkdir(parents=True, exist_ok=True)
    plot(runs, metric, output / "comparison.png", result)
    report = {
        "experiment": experiment,
        "verdict": result,
        "runs": [{k: v for k, v in asdict(r).items() if k != "curves"} for r in runs],
    }
    run = None
    if log_run:
        exp_id = client.get_run(runs[0].run_id).info.experiment_id
        run = client.create_run(
            exp_id,
            run_name=f"compare {metric}",
            tags={
                KIND_TAG: "comparison",
                "dtrain.compared_runs": ",".join(r.run_id for r in runs),
                "dtrain.verdict": "ok" if result["ok"] else "gap",
            },
        )
        report["comparison_run_id"] = run.info.run_id
    (output / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
    if run is not None:
        client.log_artifact(run.info.run_id, str(output / "comparison.png"))
        client.log_artifact(run.info.run_id, str(output / "comparison.json"))
        client.set_terminated(run.info.run_id, "FINISHED")
    report["table"] = table(runs, metric)
    return report


def verdict_lines(result: dict[str, Any]) -> list[str]:
    b = result["baseline"]
    lines = [
        f"baseline: {b['world_size']} rank(s), run {b['run_id'][:8]} ({b['chosen_as']}), final "
        f"{result['metric']} {b['final']:.4f}; tolerance {result['tolerance']:g}"
    ]
    for c in result["checks"]:
        lines.append(
            f"  {c['world_size']} ranks (batch {c['global_batch']}, {c['scale_rule']}): final {c['final']:.4f}, "
            f"gap {c['gap']:+.4f} -> {'within tolerance' if c['within_tolerance'] else 'OUTSIDE tolerance'}"
        )
    lines.append(
        "verdict: " + ("converges like the baseline" if result["ok"] else "does NOT converge like the baseline")
    )
    return lines + invariance_commands(result)


def invariance_commands(result: dict[str, Any]) -> list[str]:
    """For each multi-rank run outside the tolerance, the check that finds the step, module and
    cause where its recipe parts from 1 rank (its own config.yaml, at its world size)."""
    found = sorted(
        {
            (c["world_size"], c["output_dir"])
            for c in result["checks"]
            if not c["within_tolerance"] and c["world_size"] > 1 and c.get("output_dir")
        }
    )
    if not found:
        return []
    return ["where the runs part (the first step, module and likely cause, in seconds):"] + [
        f"  dtrain check {Path(out) / 'config.yaml'} --only invariance --nproc-per-node {world} "
        f"output_dir={out}-invariance"
        for world, out in found
    ]
