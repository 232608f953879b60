"""`lr_range`: the LR range test (Smith 2017; fastai's lr_find). The recipe's optimizer on a
fresh model, its LR multiplied by a constant factor each step from 1e-7 to 10 while the
smoothed loss is recorded, stopping once it exceeds 4x its minimum. The suggested peak LR is
a tenth of the LR at the minimum (the steepest useful LR lies below it); the recipe's scaled
LR is compared with it."""

from __future__ import annotations

import math
from pathlib import Path

from dtrain.engines import optim
from dtrain.studies.check.context import Context, Result, no_dropout, skip
from dtrain.tasks import Task as SupervisedTask

START_LR, END_LR, STEPS = 1e-7, 10.0, 100
SMOOTHING = 0.9


def lr_sweep(task: SupervisedTask, ctx: Context) -> tuple[list[float], list[float]]:
    """(LRs, bias-corrected smoothed losses) until the loss diverges or the sweep ends."""
    model = no_dropout(ctx.fresh_model())
    opt = optim.build_optimizer(optim.param_groups(model, ctx.cfg.optim), ctx.cfg.optim, START_LR)
    batches = ctx.batches(STEPS)
    factor = (END_LR / START_LR) ** (1 / (STEPS - 1))
    lrs: list[float] = []
    smoothed: list[float] = []
    avg = 0.0
    for i, batch in enumerate(batches):
        lr = START_LR * factor**i
        for group in opt.param_groups:
            group["lr"] = lr
        loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            break
        avg = SMOOTHING * avg + (1 - SMOOTHING) * value
        lrs.append(lr)
        smoothed.append(avg / (1 - SMOOTHING ** (i + 1)))
        if smoothed[-1] > 4 * min(smoothed):
            break
    return lrs, smoothed


def check_lr_range(ctx: Context) -> list[Result]:
    task = ctx.task
    if not isinstance(task, SupervisedTask):
        return skip("lr_range", f"the {ctx.cfg.task} task has no single supervised loss")
    lrs, losses = lr_sweep(task, ctx)
    if len(losses) < 10:
        return [
            Result(
                "lr_range",
                "WARN",
                None,
                "-",
                f"the loss diverged after {len(losses)} steps, from "
                f"LR {START_LR:g}: check the data and the model first",
            )
        ]
    best = min(range(len(losses)), key=losses.__getitem__)
    suggested = lrs[best] / 10
    recipe = optim.scaled_lr(ctx.cfg.optim, ctx.plan.global_batch)
    diverged = next((lr for lr, loss in zip(lrs, losses) if loss > 4 * losses[best]), None)
    _plot(lrs, losses, suggested, recipe, ctx.plot_path("lr_range.png"))
    ratio = recipe / suggested
    detail = (
        f"per-rank batch {ctx.plan.per_rank}; loss lowest at LR {lrs[best]:.3g}, "
        + (f"diverged from {diverged:.3g}; " if diverged else "no divergence up to the sweep's end; ")
        + f"suggested range {suggested / 10:.3g} to {suggested:.3g}; recipe's scaled LR {recipe:.3g} "
        f"= {ratio:.2g} x the suggestion (plot check/lr_range.png)"
    )
    want = f"recipe LR within 0.03x to 3x of {suggested:.3g}"
    if diverged is not None and recipe >= diverged:
        return [
            Result(
                "lr_range",
                "WARN",
                ratio,
                want,
                detail + ": the recipe's LR is where the loss diverged "
                "(warmup may carry it, but lower optim.lr first if training is unstable)",
            )
        ]
    verdict = "PASS" if 0.03 <= ratio <= 3 else "WARN"
    return [Result("lr_range", verdict, ratio, want, detail)]


def _plot(lrs: list[float], losses: list[float], suggested: float, recipe: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggested, color="green", ls="--", label=f"suggested {suggested:.2g}")
    ax.axvline(recipe, color="red", ls=":", label=f"recipe {recipe:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss", title="LR range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
