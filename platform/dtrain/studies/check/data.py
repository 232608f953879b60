"""`data`: a look at the data as the model gets it. Class balance of the training labels,
test samples that also occur in the training split, and the inputs exactly as they reach
the model (captured by a forward pre-hook while the task computes its loss, so after any
augmentation), with a picture of that batch (images) or its decoded text."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sized, cast

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from dtrain.studies.check.context import Context, Result
from dtrain.tasks import Task as SupervisedTask

MAX_HASHED = 50_000  # samples per split compared for duplicates (in order: deterministic)


def check_data(ctx: Context) -> list[Result]:
    return [_balance(ctx.train_set), _duplicates(ctx.train_set, ctx.eval_set), *_inputs(ctx)]


def sample_input(sample: Any) -> Any:
    """The input part of a sample or batch: the first element of a tuple/list, else itself."""
    return sample[0] if isinstance(sample, (tuple, list)) else sample


def _labels(ds: Dataset[Any]) -> torch.Tensor | None:
    """Scalar integer labels of every training sample, or None (no labels, or sequences)."""
    tensors = getattr(ds, "tensors", None)
    y: torch.Tensor | None
    if tensors is not None and len(tensors) >= 2:
        y = tensors[-1]
    else:
        first = ds[0]
        if not isinstance(first, (tuple, list)) or len(first) < 2:
            return None
        y = (
            torch.as_tensor([int(ds[i][-1]) for i in range(min(len(cast(Sized, ds)), MAX_HASHED))])
            if torch.as_tensor(first[-1]).dim() == 0
            else None
        )
    if y is None or y.is_floating_point() or y.dim() != 1:
        return None
    return y


def _balance(ds: Dataset[Any]) -> Result:
    y = _labels(ds)
    if y is None:
        return Result("data/balance", "SKIP", None, "-", "targets are not one class label per sample")
    counts = torch.bincount(y - y.min())
    present = counts[counts > 0]
    ratio = float(present.max() / present.min())
    detail = (
        f"{len(present)} classes in {len(y)} training samples, {int(present.min())} to {int(present.max())} per class"
    )
    missing = int((counts == 0).sum())
    if missing:
        return Result(
            "data/balance",
            "WARN",
            ratio,
            "every class present",
            detail + f"; {missing} label values between the smallest and largest never occur",
        )
    if ratio > 10:
        return Result(
            "data/balance",
            "WARN",
            ratio,
            "largest / smallest class <= 10",
            detail + ": imbalanced (weight the loss or resample, and watch per-class metrics)",
        )
    return Result("data/balance", "PASS", ratio, "largest / smallest class <= 10", detail)


def digest(x: Any) -> bytes:
    """A content hash of one input (bytes, dtype and shape): equal inputs, equal digests."""
    t = torch.as_tensor(x).contiguous()
    return hashlib.blake2b(
        t.numpy().tobytes() + str(t.dtype).encode() + str(tuple(t.shape)).encode(), digest_size=16
    ).digest()


def _duplicates(train: Dataset[Any], test: Dataset[Any]) -> Result:
    n_train, n_test = min(len(cast(Sized, train)), MAX_HASHED), min(len(cast(Sized, test)), MAX_HASHED)
    seen = {digest(sample_input(train[i])) for i in range(n_train)}
    dup = sum(digest(sample_input(test[i])) in seen for i in range(n_test))
    share = dup / max(n_test, 1)
    detail = f"{dup} of {n_test} test inputs also in the first {n_train} training inputs"
    want = "0 test inputs in the training split"
    if dup == 0:
        return Result("data/duplicates", "PASS", share, want, detail)
    verdict = "WARN" if share < 0.01 else "FAIL"
    return Result(
        "data/duplicates",
        verdict,
        share,
        want,
        detail + ": the test score overstates how the model generalises (deduplicate before splitting)",
    )


def _inputs(ctx: Context) -> list[Result]:
    """Statistics of the first training batch's inputs as the model receives them."""
    batch = ctx.batches(1)[0]
    models = ctx.fresh_models()
    seen = _model_input(ctx, models, batch)
    if seen is None:
        return [Result("data/inputs", "SKIP", None, "-", "no tensor input to look at")]
    if not seen.is_floating_point():
        return [_tokens(ctx, models, seen)]
    x = seen.float()
    per_channel = x.transpose(0, 1).flatten(1) if x.dim() == 4 else x.flatten().unsqueeze(0)
    means, stds = per_channel.mean(1), per_channel.std(1)
    picture = _picture(x, ctx.plot_path("data_batch.png")) if x.dim() == 4 and x.shape[1] in (1, 3) else ""
    detail = (
        f"batch {tuple(x.shape)}: mean {_fmt(means)}, std {_fmt(stds)}, range [{float(x.min()):.3g}, "
        f"{float(x.max()):.3g}]" + (f"; {picture}" if picture else "")
    )
    worst = float(means.abs().max())
    want = "|mean| <= 1 and 0.1 <= std <= 10 per channel"
    if not bool(torch.isfinite(x).all()):
        return [Result("data/inputs", "FAIL", worst, want, detail + ": NaN or inf in the inputs")]
    if worst > 1 or float(stds.min()) < 0.1 or float(stds.max()) > 10:
        return [
            Result(
                "data/inputs",
                "WARN",
                worst,
                want,
                detail + ": not normalised (standardise the inputs with the training split's statistics)",
            )
        ]
    return [Result("data/inputs", "PASS", worst, want, detail)]


def _model_input(ctx: Context, models: dict[str, nn.Module], batch: Any) -> torch.Tensor | None:
    """The first model's input as it arrives: captured during the task's own loss for a
    supervised task (after augmentation), else what the task says the model is called on."""
    if not isinstance(ctx.task, SupervisedTask):
        return next(iter(ctx.task.check_inputs(models, batch).values()), None)
    seen: list[torch.Tensor] = []
    model = models["model"]
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0]) if args else None)
    try:
        with torch.no_grad():
            ctx.task.loss(model, batch)
    finally:
        hook.remove()
    return seen[0] if seen and isinstance(seen[0], torch.Tensor) else None


def _tokens(ctx: Context, models: dict[str, nn.Module], x: torch.Tensor) -> Result:
    sizes = [m.num_embeddings for m in next(iter(models.values())).modules() if isinstance(m, nn.Embedding)]
    hi, lo = int(x.max()), int(x.min())
    text = ctx.task.describe_input(x[0])
    if text is not None:
        path = ctx.plot_path("data_batch.txt")
        path.write_text("\n\n---\n\n".join(str(ctx.task.describe_input(s)) for s in x[:4]))
    detail = f"token ids {lo} to {hi} in a batch {tuple(x.shape)}" + (
        f"; first sample decoded: {text[:60]!r}... (check/data_batch.txt)" if text is not None else ""
    )
    want = f"ids in [0, {sizes[0]})" if sizes else "ids >= 0"
    if lo < 0 or (sizes and hi >= sizes[0]):
        return Result("data/inputs", "FAIL", hi, want, detail + ": ids outside the embedding table")
    return Result("data/inputs", "PASS", hi, want, detail)


def _fmt(t: torch.Tensor) -> str:
    values = [f"{v:.3g}" for v in t.tolist()[:4]]
    return ", ".join(values) + (", ..." if len(t) > 4 else "")


def _picture(x: torch.Tensor, path: Path) -> str:
    """Up to 32 images of the batch, each scaled to its own min..max for display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = x[:32].detach().cpu()
    lo = imgs.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = imgs.flatten(1).max(1).values.view(-1, 1, 1, 1)
    imgs = ((imgs - lo) / (hi - lo).clamp(min=1e-12)).permute(0, 2, 3, 1)
    n, h, w, c = imgs.shape
    cols = min(n, 8)
    rows = -(-n // cols)
    canvas = torch.ones(rows * (h + 1), cols * (w + 1), c)
    for i in range(n):
        r, k = divmod(i, cols)
        canvas[r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = imgs[i]
    plt.imsave(path, canvas.squeeze(-1).numpy(), cmap="gray" if c == 1 else None)
    return f"picture check/{path.name}"
