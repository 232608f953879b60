"""The training step and the evaluation pass, written once against the `Engine` protocol.

`train_step` is the whole data path of one optimizer step, top to bottom, the way nanoGPT's
loop or torchvision's `train_one_epoch` reads; what differs between DDP and DeepSpeed lives
behind the engine.
"""

from __future__ import annotations

from typing import Any

import torch

from dtrain.runtime import distributed
from dtrain.data import batch_len, head, move, start
from dtrain.features.profile import region
from dtrain.protocols import Engine, StepOutput


def train_step(engine: Engine, task: Any, micro_batches: list[Any], objective: Any = None) -> StepOutput:
    """One optimizer step over `len(micro_batches)` micro-batches of this rank. `objective`
    (`dtrain.train.objective.Objective`): the loss is the task's plus distillation / EWC terms."""
    n = len(micro_batches)
    loss_sum = torch.zeros((), device=engine.device)
    term_sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        # DDP all-reduces gradients bucket by bucket during the last micro-step's backward;
        # the earlier micro-steps only accumulate locally, so one step costs one all-reduce.
        with engine.no_sync(skip=i < n - 1):
            with engine.precision.autocast(), region("forward"):
                if objective is None:
                    loss, terms = task.loss(engine.model, batch), {}
                else:
                    loss, terms = objective.loss(task, engine, batch)
            with region("backward"):
                engine.backward(loss, n)
        loss_sum += loss.detach().float()
        for k, v in terms.items():
            term_sums[k] = term_sums[k] + v / n if k in term_sums else v / n
    with region("optimizer"):
        grad_norm, stepped = engine.step()
    engine.precision.update()
    return StepOutput(loss_sum / n, grad_norm, stepped, term_sums)


@torch.no_grad()
def evaluate(engine: Engine, task: Any, loader: Any, device: torch.device) -> dict[str, float]:
    """Exact sharded evaluation: per-rank sums over disjoint shards, all-reduced, then metrics.

    Every rank runs one forward per loader batch, and the loader gives every rank the same
    number of batches (padded shards, see `data.ExactShardSampler`); the padding is cut off
    before the sums, or, for a batch of padding only, its sums are weighted by zero.
    """
    return evaluate_model(engine.module, task, loader, device, engine.precision.autocast)


@torch.no_grad()
def evaluate_model(model: Any, task: Any, loader: Any, device: torch.device, autocast: Any) -> dict[str, float]:
    """`evaluate` of any model of the task (a distillation teacher's too), under `autocast()`."""
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    real_left = getattr(loader.sampler, "num_real", len(loader.sampler))
    for batch in start(loader):
        n = batch_len(batch)
        keep = min(n, real_left)
        real_left -= keep
        with autocast():
            out = task.eval_sums(model, move(head(batch, keep) if 0 < keep < n else batch, device))
        for k, v in out.items():  # a batch of padding only still names the keys, with zeros
            part = v.detach().double() if keep else torch.zeros_like(v, dtype=torch.float64)
            sums[k] = sums[k] + part if k in sums else part
    model.train(was_training)
    if not sums:  # an empty evaluation set
        return {}
    keys = sorted(sums)
    reduced = distributed.all_reduce_sum(torch.stack([sums[k].to(device) for k in keys]))
    return {k: float(v) for k, v in task.eval_metrics(dict(zip(keys, reduced.tolist()))).items()}
