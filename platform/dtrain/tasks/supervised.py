"""The supervised task (`dtrain.Task`), its training step and its exact evaluation.

`train_step` is the whole data path of one optimizer step, top to bottom, the way nanoGPT's
loop or torchvision's `train_one_epoch` reads; what differs between DDP, DeepSpeed and FSDP2
lives behind the engine, and what the recipe's features add to the loss comes in `terms`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from dtrain.config import Config
from dtrain.data import batch_len, head, move, start
from dtrain.protocols import BaseTask, Engine, LossTerms, ModelSpec, StepOutput
from dtrain.runtime import distributed
from dtrain.runtime.timing import region
from dtrain.tasks import finetune
from dtrain.tasks.initialization import initialize


class Task(BaseTask):
    """The supervised task: one model called `model`, stepped by `train_step` and evaluated by
    `evaluate` below. A task implements `datasets`, `build_model`, `loss` (or `outputs` and
    `output_loss`), `eval_sums` and `eval_metrics`; the rest has defaults (see `BaseTask`)."""

    capabilities = frozenset({"supervised"})

    config_class: type[Config] = Config

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def inference_model(self) -> nn.Module:
        return self.build_model()

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean loss of one micro-batch (already on the device). Default: `output_loss` of
        `outputs`; a task that implements those two can be distilled (`dtrain.features.distill`)."""
        return self.output_loss(self.outputs(model, batch), batch)

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model's logits for a batch, (..., classes): what distillation matches between a
        teacher and a student, and what the Fisher information of `ewc` is taken from. Default:
        `model(batch[0])`."""
        out: torch.Tensor = model(batch[0])
        return out

    def output_mask(self, batch: Any) -> torch.Tensor | None:
        """Which rows of the flattened `outputs` are real samples (a sequence model's positions
        that are not padding): distillation and EWC's Fisher read only those. None: all."""
        return None

    def output_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """The task's loss given `outputs(model, batch)` (implement it, or `loss`)."""
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Per-batch *sums* (e.g. loss_sum, correct, count); they are added over batches and
        ranks, then `eval_metrics` turns them into metrics: exact at any world size."""
        raise NotImplementedError

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def zero_inputs(self, batch: Any) -> Any:
        """The batch with its inputs zeroed and its targets kept (`dtrain check`'s
        input-independent baseline). Default: a batch (inputs, *targets)."""
        return (torch.zeros_like(batch[0]), *batch[1:])

    def expected_init_loss(self, model: nn.Module, batch: Any) -> float | None:
        """The loss a correct initialisation gives (`dtrain check`'s `init_loss`). Default: a
        classifier (outputs (..., C), integer targets of the outputs' leading shape) starts at
        ln(C), the cross-entropy of a uniform guess; None when the task is not of that shape."""
        inputs, targets = batch[0], batch[-1]
        with torch.no_grad():
            out = model(inputs)
        if (
            isinstance(out, torch.Tensor)
            and isinstance(targets, torch.Tensor)
            and not targets.is_floating_point()
            and out.dim() >= 2
            and out.shape[:-1] == targets.shape
            and out.shape[-1] > 1
        ):
            return math.log(out.shape[-1])
        return None

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The model's repeated units (see `ModelSpec.blocks`). Default: none, one unit."""
        return []

    def init_weights(self, model: nn.Module) -> None:
        """What follows `model.init`'s scheme (runs for `default` too): e.g. zero-initialised
        residual branches, an output bias from the class prior. Default: nothing."""

    def models(self) -> dict[str, ModelSpec]:
        model = self.build_model()
        initialize(model, self.cfg.model.init)
        self.init_weights(model)
        if self.cfg.model.init_from:
            finetune.init_from(model, self.cfg.model.init_from)
        finetune.freeze(model, self.cfg.model.freeze)
        return {
            "model": ModelSpec(
                model, self.cfg.optim, broadcast_buffers=not self.cfg.model.sync_bn, blocks=self.blocks(model)
            )
        }

    def train_step(
        self, engines: dict[str, Engine], micro_batches: list[Any], terms: LossTerms | None = None
    ) -> StepOutput:
        return train_step(engines["model"], self, micro_batches, terms)

    def evaluate(self, engines: dict[str, Engine], loader: DataLoader[Any], device: torch.device) -> dict[str, float]:
        return evaluate(engines["model"], self, loader, device)


def train_step(engine: Engine, task: Task, micro_batches: list[Any], terms: LossTerms | None = None) -> StepOutput:
    """One optimizer step over `len(micro_batches)` micro-batches of this rank; the loss is the
    task's, with what the recipe's features add to it (`terms`: distillation, EWC, ...)."""
    n = len(micro_batches)
    loss_sum = torch.zeros((), device=engine.device)
    term_sums: dict[str, torch.Tensor] = {}
    logged: dict[str, torch.Tensor]
    for i, batch in enumerate(micro_batches):
        # DDP all-reduces gradients bucket by bucket during the last micro-step's backward;
        # the earlier micro-steps only accumulate locally, so one step costs one all-reduce.
        with engine.no_sync(skip=i < n - 1):
            with engine.precision.autocast(), region("forward"):
                if terms is None:
                    loss, logged = task.loss(engine.model, batch), {}
                elif terms.needs_outputs:
                    outputs = task.outputs(engine.model, batch)
                    loss, logged = terms(task.output_loss(outputs, batch), outputs, batch)
                else:
                    loss, logged = terms(task.loss(engine.model, batch), None, batch)
            with region("backward"):
                engine.backward(loss, n)
        loss_sum += loss.detach().float()
        for k, v in logged.items():
            term_sums[k] = term_sums[k] + v / n if k in term_sums else v / n
    with region("optimizer"):
        grad_norm, stepped = engine.step()
    engine.precision.update()
    return StepOutput(loss_sum / n, grad_norm, stepped, term_sums)


@torch.no_grad()
def evaluate(engine: Engine, task: Task, loader: Any, device: torch.device) -> dict[str, float]:
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
