"""Checks of the model on the task's data: the loss at initialisation, overfitting one batch,
an input-independent baseline, and that no sample (or position) sees another's input."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from dtrain.data import head
from dtrain.runtime.files import first_line
from dtrain.studies.check.context import Context, Result, no_dropout, skip
from dtrain.tasks import Task as SupervisedTask

OVERFIT_SAMPLES = 8
OVERFIT_MAX_STEPS = 400
BASELINE_SAMPLES, BASELINE_STEPS = 8, 60
FIT_LR = 1e-3  # Adam at 1e-3: forgiving enough that a failure to fit means the model, not the LR


def _supervised(ctx: Context) -> SupervisedTask | None:
    return ctx.task if isinstance(ctx.task, SupervisedTask) else None


def _fit(
    task: SupervisedTask, model: nn.Module, batches: list[Any], steps: int, stop_below: float = 0.0
) -> list[float]:
    """Adam on `batches` in turn; the loss of every step, up to one below `stop_below` x the first."""
    opt = torch.optim.Adam(model.parameters(), lr=FIT_LR)
    losses: list[float] = []
    for i in range(steps):
        loss = task.loss(model, batches[i % len(batches)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < stop_below * losses[0]:
            break
    return losses


def check_init_loss(ctx: Context) -> list[Result]:
    task = _supervised(ctx)
    if task is None:
        return skip("init_loss", f"the {ctx.cfg.task} task has no single supervised loss")
    model = ctx.fresh_model().train()
    batches = ctx.batches(4)
    with torch.no_grad():
        loss = sum(float(task.loss(model, b)) for b in batches) / len(batches)
    expected = task.expected_init_loss(model, batches[0])
    if expected is None:
        return [
            Result(
                "init_loss",
                "SKIP",
                loss,
                "-",
                "the task declares no loss a correct init gives (Task.expected_init_loss returned None)",
            )
        ]
    ratio = loss / expected
    want = f"{expected:.4g} (ln {round(math.exp(expected))}: a uniform guess)"
    detail = f"mean loss of {len(batches)} training batches at init = {ratio:.2f} x expected"
    if not math.isfinite(loss) or ratio > 1.6:
        return [
            Result(
                "init_loss",
                "FAIL",
                loss,
                want,
                detail + ": the outputs are far from uniform at init "
                "(a last layer with a large bias or weight scale?), or the loss is not the one named",
            )
        ]
    if ratio < 0.6:
        return [
            Result(
                "init_loss",
                "FAIL",
                loss,
                want,
                detail + ": below chance before training (labels "
                "leaking into the inputs, or a loss that is not a mean over samples?)",
            )
        ]
    verdict = "PASS" if 0.8 <= ratio <= 1.25 else "WARN"
    return [Result("init_loss", verdict, loss, want, detail)]


def check_overfit_batch(ctx: Context) -> list[Result]:
    task = _supervised(ctx)
    if task is None:
        return skip("overfit_batch", f"the {ctx.cfg.task} task has no single supervised loss")
    batch = head(ctx.batches(1)[0], OVERFIT_SAMPLES)
    model = no_dropout(ctx.fresh_model())
    losses = _fit(task, model, [batch], OVERFIT_MAX_STEPS, stop_below=0.02)
    first, last = losses[0], min(losses[-5:])
    ratio = last / first if first > 0 else float("nan")
    detail = (
        f"{len(losses)} Adam steps (lr {FIT_LR:g}) on one batch of {OVERFIT_SAMPLES}: loss {first:.4g} -> {last:.4g}"
    )
    want = "loss < 5% of the first (memorised)"
    if ratio < 0.05:
        return [Result("overfit_batch", "PASS", last, want, detail)]
    if ratio < 0.2:
        return [Result("overfit_batch", "WARN", last, want, detail + ": slow to memorise one batch")]
    return [
        Result(
            "overfit_batch",
            "FAIL",
            last,
            want,
            detail + ": cannot memorise one batch (the output "
            "ignores the input, the model is far too small, or the loss/labels are wired wrong)",
        )
    ]


def check_input_independent(ctx: Context) -> list[Result]:
    task = _supervised(ctx)
    if task is None:
        return skip("input_independent", f"the {ctx.cfg.task} task has no single supervised loss")
    batches = [head(b, BASELINE_SAMPLES) for b in ctx.batches(4)]
    losses = {}
    for kind in ("real", "zeroed"):
        fed = batches if kind == "real" else [task.zero_inputs(b) for b in batches]
        model = no_dropout(ctx.fresh_model())
        _fit(task, model, fed, BASELINE_STEPS)
        with torch.no_grad():  # training mode, as fitted: eval-mode statistics lag this early
            losses[kind] = sum(float(task.loss(model, b)) for b in fed) / len(fed)
    ratio = losses["real"] / losses["zeroed"]
    detail = (
        f"{BASELINE_STEPS} Adam steps on {len(batches)} batches of {BASELINE_SAMPLES}: training loss "
        f"{losses['real']:.4g} with the inputs, {losses['zeroed']:.4g} with them zeroed"
    )
    want = "real < 0.9 x zeroed"
    if ratio < 0.9:
        return [Result("input_independent", "PASS", ratio, want, detail)]
    return [
        Result(
            "input_independent",
            "WARN",
            ratio,
            want,
            detail + ": the model does no better with its inputs than without them (it is not using them)",
        )
    ]


# --------------------------------------------------------------------------- dependencies by backprop


def _input_gradient(model: nn.Module, x: torch.Tensor, pick: Any) -> torch.Tensor:
    """d(sum of output[pick]) / d(input), per input element; for integer inputs (tokens), the
    gradient reaches the output of the model's first Embedding instead."""
    if x.is_floating_point():
        x = x.detach().clone().requires_grad_(True)
        out = _first_tensor(model(x))
        return _grad_or_zero(out[pick].sum(), x)
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        raise LookupError("integer inputs and no nn.Embedding to take the gradient at")
    seen: list[torch.Tensor] = []
    hook = embeddings[0].register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        out = _first_tensor(model(x))
    finally:
        hook.remove()
    return _grad_or_zero(out[pick].sum(), seen[0])


def _grad_or_zero(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy/dx, zeros where y does not depend on x at all (a model that ignores its input)."""
    if not y.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(y, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    items = out.values() if isinstance(out, dict) else out
    return next(v for v in items if isinstance(v, torch.Tensor))


def _mixes_batch(model: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)})


def check_batch_independence(ctx: Context) -> list[Result]:
    """Backprop from sample i's output: every other sample's input must get exactly zero gradient
    (a view/reshape that mixes the batch shows up here). Normalisation that legitimately mixes
    the batch in training (BatchNorm) is put in eval mode, as the detail says."""
    models = ctx.fresh_models()
    inputs = ctx.task.check_inputs(models, ctx.batches(1)[0])
    results: list[Result] = []
    for name, x in inputs.items():
        model, x = models[name].eval(), x[:4]
        label = "batch_independence" if len(inputs) == 1 else f"batch_independence/{name}"
        if len(x) < 2:
            results += skip(label, "needs a batch of at least 2")
            continue
        g = _input_gradient(model, x, 1).abs().flatten(1).amax(1)
        own, others = float(g[1]), float(torch.cat([g[:1], g[2:]]).max())
        norms = _mixes_batch(model)
        detail = (
            f"eval mode ({', '.join(norms)} use running statistics; in training they mix the batch by design); "
            if norms
            else "eval mode; "
        ) + f"|d out[1] / d in[1]| = {own:.3g}"
        want = "0 for every other sample"
        if own == 0:
            results.append(
                Result(label, "WARN", others, want, detail + ": the output does not depend on its own input either")
            )
        elif others > 1e-6 * own:
            results.append(
                Result(
                    label,
                    "FAIL",
                    others,
                    want,
                    detail + ": sample 1's output depends on other "
                    "samples' inputs (a view/reshape or reduction across the batch dimension?)",
                )
            )
        else:
            results.append(Result(label, "PASS", others, want, detail))
    if ctx.task.causal:
        results.append(_causal(models, inputs))
    return results


def _causal(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor]) -> Result:
    """Backprop from position t of one sequence: later positions must get exactly zero gradient."""
    name, x = next(iter(inputs.items()))
    t = x.shape[1] // 2
    try:
        g = _input_gradient(models[name].eval(), x[:2], (0, t)).abs()[0].flatten(1).amax(1)  # per position
    except IndexError as e:  # fewer outputs than positions: nothing to look at, which is not a leak
        return Result(
            "causal",
            "SKIP",
            None,
            "0 for every later position",
            f"the output has no position {t} of {x.shape[1]} ({first_line(e)}): the check needs one "
            "output per input position (a forward that returns only the last position's logits, as "
            "nanoGPT's does without targets, cannot be checked)",
        )
    past, future = float(g[: t + 1].max()), float(g[t + 1 :].max())
    detail = f"|d out[t={t}] / d in[<=t]| = {past:.3g}"
    if future > 1e-6 * past:
        first_leak = int((g[t + 1 :] > 1e-6 * past).nonzero()[0]) + t + 1
        return Result(
            "causal",
            "FAIL",
            future,
            "0 for every later position",
            detail + f": position {t} sees position {first_leak} (the causal mask leaks the future)",
        )
    return Result("causal", "PASS", future, "0 for every later position", detail)
