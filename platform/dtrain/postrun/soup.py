"""Combining trained models by their weights: `dtrain soup`, `dtrain interpolate`, `dtrain evaluate`.

- **Soups** (Wortsman et al. 2022) of runs fine-tuned from one start: `uniform` (the mean),
  `greedy` (ingredients in order of their own held-out score, each kept only if the soup's
  score does not drop: the soup never scores below its best ingredient), `weighted` (FedAvg's
  rule: each run weighted by its training set's size, or by `--weights`).
- **Interpolation** theta(alpha) = (1 - alpha) theta_A + alpha theta_B, evaluated at each alpha:
  the loss and metric along the line. A bump between the ends (the barrier, Frankle et al.
  2020) says the two runs sit in different basins; none says a soup of them will work.

An ingredient is a finished run's output_dir or a `step_*` checkpoint folder of any engine
(DDP, DeepSpeed, FSDP2 read whole in one process). All must be of one task and architecture
(refused in one line otherwise). The held-out set is the first ingredient's evaluation set,
scored exactly (every sample once). BatchNorm statistics are recomputed on training batches
for every mixed model (`--bn-batches`; averaged running statistics do not belong to averaged
weights), not for an ingredient alone: interpolation's ends are the runs themselves. Pruned
ingredients keep their sparsity: a weight pruned in any of them stays zero (masks intersected).

The result is a run folder (config.yaml, model.safetensors, preprocessing.safetensors,
soup.json), so `dtrain predict`, `dtrain.load`, `distill.teacher` and another soup take it.
Each command is one MLflow run in the ingredients' experiment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Sized, cast

import torch
import torch.nn as nn

from dtrain import checkpoint, engines, tracking
from dtrain.checkpoint import safeload
from dtrain.config import Config, recipe
from dtrain.errors import ConfigError
from dtrain.postrun import average
from dtrain.postrun.average import evaluate_model
from dtrain.runtime.files import atomic_write
from dtrain.tasks import get_task
from dtrain.train.config import load_config


@dataclass
class Ingredient:
    name: str
    cfg: Config
    weights: dict[str, torch.Tensor]


def read(path: str | Path, trust: bool = False, overrides: Sequence[str] = ()) -> Ingredient:
    """A run's final weights (output_dir) or a checkpoint's (step_* folder), with the run's config."""
    p = Path(path)
    if (p / checkpoint.TRAINER).is_file():  # step_X of output_dir/checkpoints
        cfg = load_config(p.parent.parent / "config.yaml", overrides, trust=trust)
        task = get_task(cfg.task)(cfg)
        task.datasets()  # the model's shape may depend on the data (classes, vocabulary)
        model = task.inference_model()
        return Ingredient(str(p), cfg, engines.engine_class(cfg.engine).read_weights(p / "model", model, trust))
    if not (p / "config.yaml").is_file() or not safeload.weights_file(p).is_file():
        raise ConfigError(
            "run",
            str(p),
            "is neither a finished run's output_dir (config.yaml, model.safetensors) nor a step_* checkpoint folder",
        )
    cfg = load_config(p / "config.yaml", overrides, trust=trust)
    return Ingredient(str(p), cfg, safeload.load_weights(safeload.weights_file(p)))


class Bench:
    """The first ingredient's task, model and data: scores any weights of that architecture."""

    def __init__(self, first: Ingredient, bn_batches: int):
        self.cfg = first.cfg
        self.task = get_task(self.cfg.task)(self.cfg)
        self.train, self.eval = self.task.datasets()
        self.model: nn.Module = self.task.inference_model()
        self.keys = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        self.bn_batches = bn_batches
        metric, self.higher = self.task.headline_metric()
        self.metric = metric

    def check(self, ing: Ingredient) -> None:
        """One task and one architecture, or one line saying what differs."""
        if ing.cfg.task != self.cfg.task:
            raise ConfigError("run", ing.name, f"is a {ing.cfg.task} run; the first is {self.cfg.task}: one task only")
        theirs = {k: tuple(v.shape) for k, v in ing.weights.items()}
        if theirs != self.keys:
            diff = sorted(set(theirs.items()) ^ set(self.keys.items()))[:3]
            raise ConfigError(
                "run",
                ing.name,
                f"has another architecture than the first ({diff}): soups and interpolation need one architecture",
            )

    def score(self, weights: dict[str, torch.Tensor], refresh_bn: bool) -> dict[str, float]:
        self.model.load_state_dict(weights)
        if refresh_bn:
            average.refresh_bn(self.model, self.train, self.cfg, self.bn_batches)
        return evaluate_model(self.task, self.model, self.eval, self.cfg.data.eval_batch_size)

    def better(self, a: float, b: float) -> bool:
        """a at least as good as b."""
        return a >= b if self.higher else a <= b

    def save(self, folder: Path, extra: dict[str, Any]) -> None:
        """A run folder for the weights now in the model (BatchNorm statistics included)."""
        folder.mkdir(parents=True, exist_ok=True)
        safeload.save_weights(self.model.state_dict(), folder / "model.safetensors")
        safeload.save_weights(self.task.preprocessing(), folder / safeload.PREPROCESSING)
        recipe.dump_yaml(self.cfg, folder / "config.yaml")
        text = json.dumps(extra, indent=2) + "\n"
        atomic_write(folder / "soup.json", lambda tmp: tmp.write_text(text))


def mix(states: list[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_k w_k state_k (float64, then each tensor's dtype), the weights normalised to 1;
    integer tensors (counters) from the first. A floating tensor that is zero at a place in any
    state stays zero there when the states are sparse (pruned): their masks are intersected."""
    total = sum(weights)
    out = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        mixed = sum(w / total * s[key].double() for w, s in zip(weights, states))
        if first.dim() >= 2 and all((s[key] == 0).any() for s in states):  # a Conv/Linear weight pruned in each
            mixed = mixed * torch.stack([s[key] != 0 for s in states]).all(0)
        out[key] = cast(torch.Tensor, mixed).to(first.dtype)
    return out


def line(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) a + alpha b, exactly a at 0 and exactly b at 1."""
    if alpha == 0:
        return a.clone()
    if alpha == 1:
        return b.clone()
    return ((1 - alpha) * a.double() + alpha * b.double()).to(a.dtype) if a.is_floating_point() else a.clone()


def soup(
    paths: list[str], method: str, output: Path, bn_batches: int, weights: Sequence[float] = (), trust: bool = False
) -> dict[str, Any]:
    """Make the soup, write its run folder, return what soup.json holds."""
    if len(paths) < 2:
        raise ConfigError("runs", paths, "a soup needs 2 or more runs")
    ings = [read(p, trust) for p in paths]
    bench = Bench(ings[0], bn_batches)
    for ing in ings:
        bench.check(ing)
    if weights and len(weights) != len(ings):
        raise ConfigError("--weights", list(weights), f"one weight per run ({len(ings)})")
    scores = [bench.score(i.weights, refresh_bn=False)[bench.metric] for i in ings]
    if method == "greedy":
        order = sorted(range(len(ings)), key=lambda k: scores[k], reverse=bench.higher)
        kept, best = [order[0]], scores[order[0]]
        for k in order[1:]:
            value = bench.score(mix([ings[j].weights for j in [*kept, k]], [1.0] * (len(kept) + 1)), True)[bench.metric]
            if bench.better(value, best):
                kept, best = [*kept, k], value
        share = [1.0 if k in kept else 0.0 for k in range(len(ings))]
    elif method == "weighted":
        share = list(weights) or [float(len(cast(Sized, get_task(i.cfg.task)(i.cfg).datasets()[0]))) for i in ings]
    else:
        share = [1.0] * len(ings)
    used = [k for k, w in enumerate(share) if w > 0]
    mixed = mix([ings[k].weights for k in used], [share[k] for k in used])
    metrics = bench.score(mixed, refresh_bn=len(used) > 1)
    report = {
        "method": method,
        "metric": bench.metric,
        "soup": metrics,
        "ingredients": [
            {"run": i.name, bench.metric: s, "weight": w / sum(share)} for i, s, w in zip(ings, scores, share)
        ],
    }
    bench.save(output, report)
    _track(
        bench.cfg,
        f"soup-{method}",
        {"method": method, "runs": len(ings), "kept": len(used)},
        [(0, metrics)],
        [output / "soup.json"],
    )
    return report


def interpolate(
    a: str, b: str, alphas: list[float], output: Path, bn_batches: int, trust: bool = False
) -> dict[str, Any]:
    """Evaluate theta(alpha) along the line from run A to run B; write the curve (JSON, PNG)."""
    ia, ib = read(a, trust), read(b, trust)
    bench = Bench(ia, bn_batches)
    bench.check(ib)
    points = []
    for alpha in alphas:
        mixed = {k: line(ia.weights[k], ib.weights[k], alpha) for k in ia.weights}
        points.append({"alpha": alpha, **bench.score(mixed, refresh_bn=0 < alpha < 1)})
    m = bench.metric
    ends = (points[0][m], points[-1][m])
    # The barrier: how much worse the worst point is than the straight line between the ends.
    gaps = [
        (ends[0] + (p["alpha"] - alphas[0]) / (alphas[-1] - alphas[0]) * (ends[1] - ends[0]) - p[m])
        * (1 if bench.higher else -1)
        for p in points
    ]
    report = {"a": ia.name, "b": ib.name, "metric": m, "barrier": max(gaps), "points": points}
    output.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(output / "interpolation.json", lambda tmp: tmp.write_text(text))
    _plot(points, m, output / "interpolation.png", f"{Path(ia.name).name} -> {Path(ib.name).name}")
    _track(
        bench.cfg,
        "interpolate",
        {"a": ia.name, "b": ib.name},
        [(i, {k: v for k, v in p.items() if k != "alpha"}) for i, p in enumerate(points)],
        [output / "interpolation.json", output / "interpolation.png"],
    )
    return report


def evaluate(path: str, overrides: Sequence[str], trust: bool = False) -> dict[str, float]:
    """A run's (or checkpoint's) model on its task's held-out set, the recipe changed by
    `overrides` (e.g. `data.classes=[0,1,2,3,4]`: how well it still does an earlier task)."""
    ing = read(path, trust, overrides)
    bench = Bench(ing, 0)
    bench.check(ing)
    return bench.score(ing.weights, refresh_bn=False)


def _plot(points: list[dict[str, float]], metric: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss", *([metric] if metric != "loss" else [])]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5))
    for ax, key in zip(axes if len(keys) > 1 else [axes], keys):
        ax.plot([p["alpha"] for p in points], [p[key] for p in points], marker="o")
        ax.set_xlabel("alpha (0: A, 1: B)")
        ax.set_ylabel(f"eval {key}")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _track(
    cfg: Config, name: str, params: dict[str, Any], points: list[tuple[int, dict[str, float]]], files: list[Path]
) -> None:
    """One MLflow run for the command, where the ingredients' runs are tracked."""
    cfg.tracking.run_name = name
    tracker = tracking.start(cfg, params, {"dtrain.kind": name.split("-")[0]}, None)
    try:
        for step, metrics in points:
            tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step)
        for f in files:
            tracker.log_artifact(f)
    finally:
        tracker.finish("FINISHED")
