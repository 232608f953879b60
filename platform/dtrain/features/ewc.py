"""Elastic Weight Consolidation (`ewc.*`, Kirkpatrick et al. 2017): learn a new task without
forgetting an old one by pulling each weight back toward the old run's value in proportion to
how much the old task depends on it:

    loss = new task's loss + lambda / 2 * sum_i F_i (theta_i - theta*_i)^2

theta* are the old run's weights; F is the diagonal of the Fisher information of the old
model on the old task's training data, E_x E_{y ~ p(y|x)} [(d log p(y|x) / d theta_i)^2], with
y drawn from the model (the true Fisher, not the empirical one on the labels), one gradient per
sample. Each rank takes every world-th sample of one seeded choice and the squares are summed
over the ranks, so F does not depend on the world size; a sample's label is drawn from its own
stream (`data.sample_generator`).

Under FSDP2 the penalty is computed on this rank's shards of the parameters (F and theta*
sliced the same way): each rank adds its part, the gradient lands on the shard it belongs to,
and no parameter is gathered for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sized, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import default_collate

from dtrain.config.schema import positive, require
from dtrain.data import move, sample_generator
from dtrain.errors import ConfigError
from dtrain.protocols import Feature, Run
from dtrain.runtime import distributed
from dtrain.tasks.runs import FOREIGN_TASK, open_run


@dataclass
class EWCConfig:
    from_: str = ""
    """Elastic Weight Consolidation: a finished run's output_dir whose task must not be forgotten.
    Its weights are the anchor (and the start, unless model.init_from says otherwise); its
    diagonal Fisher information is estimated on its own training data at the start of this run.
    Empty: off."""
    lambda_: float = 10.0
    """Penalty weight: loss += lambda / 2 * sum_i F_i (theta_i - theta*_i)^2."""
    samples: int = 512
    """Samples of the old task's training data the Fisher is averaged over (shared out over the ranks)."""

    def validate(self) -> None:
        require(
            "ewc.from", self.from_, not self.from_ or Path(self.from_).exists(), "no such run folder or weights file"
        )
        require("ewc.lambda", self.lambda_, self.lambda_ >= 0, "must be >= 0")
        positive(self, "ewc", "samples")


def fisher_diagonal(
    task: Any, model: nn.Module, dataset: Any, samples: int, seed: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Collective: the diagonal Fisher of `model` (eval mode) over `samples` of `dataset`."""
    n = min(samples, len(cast(Sized, dataset)))
    chosen = torch.randperm(len(cast(Sized, dataset)), generator=torch.Generator().manual_seed(seed))[:n]
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    sums = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    model.eval()
    for index in chosen[distributed.rank() :: distributed.world_size()].tolist():
        batch = move(default_collate([dataset[index]]), device)
        logits = task.outputs(model, batch).float()
        logits = logits.reshape(-1, logits.size(-1))  # a sequence model: every position's distribution,
        if (mask := getattr(task, "output_mask", lambda b: None)(batch)) is not None:  # but padding's
            logits = logits[mask.reshape(-1).to(logits.device)]
        probs = F.softmax(logits.detach(), dim=-1).cpu()
        y = torch.multinomial(probs, 1, generator=sample_generator(seed, 0, index)).to(device)
        log_p = F.log_softmax(logits, dim=-1).gather(1, y).sum()
        grads = torch.autograd.grad(log_p, list(params.values()), allow_unused=True)
        for k, g in zip(params, grads):
            if g is not None:
                sums[k] += g.float() ** 2
    flat = distributed.all_reduce_sum(torch.cat([s.flatten() for s in sums.values()])) / n
    return {k: t.view_as(s) for (k, s), t in zip(sums.items(), flat.split([s.numel() for s in sums.values()]))}


def penalty(terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], lam: float) -> torch.Tensor:
    """lambda / 2 * sum F (theta - theta*)^2 over (theta, F, theta*) triples."""
    return lam / 2 * torch.stack([(f * (theta.float() - anchor) ** 2).sum() for theta, f, anchor in terms]).sum()


class Anchor:
    """The penalty toward the old run's weights, for the model this run trains."""

    def __init__(self, cfg: Any, module: nn.Module, device: torch.device):
        self.lam, where = cfg.ewc.lambda_, cfg.ewc.from_
        _, old_task, old_model = open_run(where, key="ewc.from", allowed={cfg.task}, hint=FOREIGN_TASK)
        if not hasattr(old_task, "outputs"):
            raise ConfigError(
                "ewc.from",
                where,
                f"its task ({type(old_task).__name__}) has no outputs() to take the "
                "Fisher information of: a task with one model and a loss (dtrain.Task)",
            )
        train, _ = old_task.datasets()
        old_model = old_model.to(device)
        fisher = fisher_diagonal(old_task, old_model, train, cfg.ewc.samples, cfg.seed, device)
        anchor = {k: p.detach().float() for k, p in old_model.named_parameters()}
        self.terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        matched = [
            n
            for n, p in module.named_parameters()
            if n in fisher and tuple(p.shape) == tuple(fisher[n].shape) and p.requires_grad
        ]
        if not matched:
            raise ConfigError("ewc.from", where, "no parameter of this model matches the old run's by name and shape")
        self.fisher_mean = float(sum(fisher[n].sum() for n in matched) / sum(fisher[n].numel() for n in matched))
        for name, p in module.named_parameters():
            if name in matched:
                f, a = fisher[name], anchor[name]
                if distributed.is_sharded(p):  # this rank's slice, as FSDP2 sharded the parameter
                    f, a = distributed.shard_like(f, p), distributed.shard_like(a, p)
                self.terms.append((p, f, a))
        self.sharded = any(distributed.is_sharded(p) for p, _, _ in self.terms)
        self.matched = len(self.terms)

    def penalty(self) -> torch.Tensor:
        """This rank's part of the penalty (the whole of it unless sharded)."""
        return penalty([(distributed.local_part(p), f, a) for p, f, a in self.terms], self.lam)

    def describe(self) -> str:
        return f"ewc: {self.matched} tensors anchored, lambda {self.lam:g}, mean Fisher {self.fisher_mean:.3g}"


class EWC(Feature):
    key, config_class, order = "ewc", EWCConfig, 50
    requires = {
        "supervised": "EWC needs a task with one model and a loss (dtrain.Task); a GAN has two models and its own step",
        "weights_in_place": "its penalty reads the parameters the optimizer steps, and DeepSpeed keeps those "
        "in flattened partitions of its own; use ddp or fsdp",
    }
    matrix = {"ewc": ("ewc.from={run}", "ewc.samples=8")}

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return bool(cfg.ewc.from_)

    @classmethod
    def switch(cls, cfg: Any) -> tuple[str, Any]:
        return "ewc.from", cfg.ewc.from_

    @classmethod
    def start_weights(cls, cfg: Any) -> str:
        return str(cfg.ewc.from_)  # EWC continues from the run it anchors to

    def __init__(self, run: Run):
        self.anchor: Anchor | None = None

    def setup(self, run: Run) -> None:
        """The old run's Fisher information (collective) and this model's anchored parameters."""
        self.anchor = Anchor(run.cfg, run.engines["model"].module, run.device)

    def describe(self) -> str:
        return self.anchor.describe() if self.anchor is not None else ""

    def loss(
        self, loss: torch.Tensor, outputs: torch.Tensor | None, batch: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert self.anchor is not None
        penalty = self.anchor.penalty()
        # Sharded: each rank holds a part; the logged value is averaged over ranks, so x world.
        shown = penalty.detach().float() * (distributed.world_size() if self.anchor.sharded else 1)
        return loss + penalty, {"ewc_penalty": shown}
