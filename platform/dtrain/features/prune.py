"""Pruning (`prune.*`): set a fraction of the weights to zero and keep them there while the
rest fine-tune, so the run ends with a sparse plain `model.pt`.

Which weights: every weight of a linear map (`prunable`: a module's `weight` of 2 or more
dimensions, so Linear and Conv layers, and layers of other libraries of that kind such as
`transformers`' Conv1D), except an embedding's (and a head tied to it) and frozen ones (`model.freeze`);
the start line names what was chosen and what was left out. `torch.nn.utils.prune` chooses them, on whole
copies of those weights (gathered under FSDP2): `magnitude` is `global_unstructured` with L1
(one threshold over all of them: exactly round(amount x count) zeros), `structured` is
`ln_structured` over each layer's output channels (L2). The masks are then applied to the
weights in place, on this rank's shard under FSDP2, after the pruning round and after every
optimizer step (so momentum and weight decay never revive a pruned weight). Nothing is
reparametrised: the weights are plain tensors with zeros, so checkpoints, engines and model.pt
see an ordinary model (the pruning is permanent from the start), and a resumed run reads its
masks back from the zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn as nn
from torch.nn.utils import prune

from dtrain.config.schema import non_negative, positive, require
from dtrain.errors import ConfigError
from dtrain.protocols import Feature, Run, StepOutput
from dtrain.runtime import distributed


@dataclass
class PruneConfig:
    amount: float = 0.0
    """Fraction of the prunable weights (every Conv and Linear weight) set to zero and kept there.
    0: off."""
    kind: Literal["magnitude", "structured"] = "magnitude"
    """magnitude: the smallest |w| over all prunable weights (one global threshold);
    structured: whole output channels of each layer, smallest L2 norm first."""
    schedule: Literal["once", "gradual"] = "once"
    """once: all at `prune.start_step`; gradual: from start_step to end_step every
    every_steps, on Zhu & Gupta's cubic curve s_t = amount * (1 - (1 - t)^3)."""
    start_step: int = 0
    """The step after which pruning starts (0: before the first step, e.g. a model.init_from model)."""
    end_step: int = 0
    """gradual: the step at which the sparsity reaches `amount` (0: half way through the run)."""
    every_steps: int = 10
    """gradual: steps between two pruning rounds."""

    def validate(self) -> None:
        require("prune.amount", self.amount, 0 <= self.amount < 1, "must be in [0, 1) (0: off)")
        non_negative(self, "prune", "start_step", "end_step")
        positive(self, "prune", "every_steps")
        require(
            "prune.end_step",
            self.end_step,
            self.schedule == "once" or self.end_step == 0 or self.end_step > self.start_step,
            f"must be after prune.start_step ({self.start_step})",
        )


EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def prunable(module: nn.Module) -> tuple[list[tuple[str, nn.Parameter, int]], dict[str, str]]:
    """([(name, weight, its output dimension)] of every weight of a linear map, {name: why not}
    for the weight matrices left out). A layer's kind is read off the layer, not a list of
    classes: a `weight` of 2 or more dimensions; its outputs along dim 0, or dim 1 where the
    layer multiplies x @ W (transformers' Conv1D, whose `nf` is its output width)."""
    embedded = {id(m.weight) for m in module.modules() if isinstance(m, EMBEDDINGS)}
    chosen: list[tuple[str, nn.Parameter, int]] = []
    left: dict[str, str] = {}
    seen: set[int] = set()
    for name, m in module.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() < 2 or id(w) in seen:
            continue
        seen.add(id(w))
        key = f"{name}.weight" if name else "weight"
        if id(w) in embedded:
            left[key] = "an embedding" if isinstance(m, EMBEDDINGS) else "tied to an embedding"
        elif not w.requires_grad:
            left[key] = "frozen"
        else:
            chosen.append((key, w, 1 if getattr(m, "nf", None) == w.shape[1] else 0))
    return chosen, left


class _Holder(nn.Module):
    """A whole copy of one weight, for `torch.nn.utils.prune` to compute a mask on."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)


def masks_for(weights: list[torch.Tensor], amount: float, kind: str, out_dims: list[int]) -> list[torch.Tensor]:
    """The keep-masks (1 kept, 0 pruned) `torch.nn.utils.prune` chooses for whole `weights`
    (`structured`: whole outputs, along each weight's `out_dims`)."""
    holders = [_Holder(w.detach().float().cpu().clone()) for w in weights]
    if kind == "magnitude":
        prune.global_unstructured([(h, "weight") for h in holders], pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for h, dim in zip(holders, out_dims):
            prune.ln_structured(h, "weight", amount=amount, n=2, dim=dim)
    return [cast(torch.Tensor, h.weight_mask) for h in holders]


def target(cfg: PruneConfig, step: int, total_steps: int) -> float | None:
    """The sparsity a pruning round at the end of `step` (0: before the first) aims at, or None."""
    if cfg.schedule == "once":
        return cfg.amount if step == cfg.start_step else None
    end = cfg.end_step or max(cfg.start_step + 1, total_steps // 2)
    if step < cfg.start_step or step > end or ((step - cfg.start_step) % cfg.every_steps and step != end):
        return None
    done = (step - cfg.start_step) / (end - cfg.start_step)
    amount = cfg.amount * (1 - (1 - done) ** 3)  # Zhu & Gupta 2017: fast first, slow near the end
    return amount or None  # the first round of a gradual schedule prunes nothing


class Pruner:
    """The masks of one model's prunable weights; rounds and re-application after each step."""

    def __init__(self, cfg: PruneConfig, module: nn.Module, total_steps: int):
        self.cfg, self.total_steps = cfg, total_steps
        chosen, self.left_out = prunable(module)
        self.names = [name for name, _, _ in chosen]
        self.weights: list[torch.Tensor] = [w for _, w, _ in chosen]
        self.out_dims = [dim for _, _, dim in chosen]
        self.masks: list[torch.Tensor] | None = None
        self.sparsity = 0.0
        self.rounds = 0
        """Pruning rounds run so far (resumes with the run: a resumed run that pruned reads its
        masks back from the zeros, whatever step it resumed at)."""

    def begin(self, step: int) -> tuple[float | None, str]:
        """At the loop's start (collective under FSDP2): the masks read back from a resumed run's
        zeros; round 0 of a fresh run; or, resumed past `prune.start_step` without a round (the
        key is new to this run), the round the schedule would have made by now. Returns the
        sparsity when a round ran, and why when it is not the schedule's own."""
        if self.rounds:
            self.masks = [(distributed.local_part(w.detach()) != 0).to(w.dtype) for w in self.weights]
            self.sparsity = self.measure()
            return None, ""
        if step == 0:
            return (self.after_step(0) if target(self.cfg, 0, self.total_steps) is not None else None), ""
        if step > self.cfg.start_step:
            end = self.cfg.end_step or max(self.cfg.start_step + 1, self.total_steps // 2)
            done = min(1.0, (step - self.cfg.start_step) / (end - self.cfg.start_step))
            amount = self.cfg.amount if self.cfg.schedule == "once" else self.cfg.amount * (1 - (1 - done) ** 3)
            return self._round(amount), (
                f"the checkpoint of step {step} was not pruned (prune.amount is new to it): "
                f"pruned now to the schedule's {amount:.0%}"
            )
        return None, ""

    def after_step(self, step: int) -> float | None:
        """Collective under FSDP2: a pruning round if one is due (returns the sparsity), else
        the masks applied again."""
        amount = target(self.cfg, step, self.total_steps)
        if amount is not None:
            return self._round(amount)
        self._apply()
        return None

    def _round(self, amount: float) -> float:
        """Collective under FSDP2: a pruning round to `amount`; returns the sparsity reached."""
        whole = [w.detach().full_tensor() if distributed.is_sharded(w) else w.detach() for w in self.weights]  # type: ignore[attr-defined]
        masks = masks_for(whole, amount, self.cfg.kind, self.out_dims)
        self.masks = [
            (distributed.shard_like(m.to(w.device), w) if distributed.is_sharded(w) else m.to(w.device)).to(w.dtype)
            for m, w in zip(masks, self.weights)
        ]
        self._apply()
        self.rounds += 1
        self.sparsity = self.measure()
        return self.sparsity

    @torch.no_grad()
    def _apply(self) -> None:
        """The masks on the weights again (after each optimizer step, so nothing revives them)."""
        for w, m in zip(self.weights, self.masks or []):
            distributed.local_part(w).mul_(m)

    def measure(self) -> float:
        """Collective: the fraction of the prunable weights that are zero."""
        zeros = sum(int((distributed.local_part(w) == 0).sum()) for w in self.weights)
        count = sum(distributed.local_part(w).numel() for w in self.weights)
        if any(distributed.is_sharded(w) for w in self.weights):
            both = torch.tensor([zeros, count], dtype=torch.float64, device=self.weights[0].device)
            zeros, count = (int(x) for x in distributed.all_reduce_sum(both).tolist())
        return zeros / max(count, 1)


class Prune(Feature):
    key, config_class, order = "prune", PruneConfig, 5  # before the averages see the weights
    requires = {
        "supervised": "pruning needs a task with one model and a loss (dtrain.Task); a GAN has two models "
        "and its own step",
        "weights_in_place": "it zeroes parameters in place, and DeepSpeed keeps the weights it steps in "
        "flattened partitions of its own; use ddp or fsdp",
    }
    matrix = {"prune": ("prune.amount=0.5", "prune.start_step=2")}

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return bool(cfg.prune.amount)

    @classmethod
    def switch(cls, cfg: Any) -> tuple[str, Any]:
        return "prune.amount", cfg.prune.amount

    @classmethod
    def check(cls, cfg: Any) -> None:
        if cfg.optim.name.startswith("schedulefree"):
            raise ConfigError(
                "prune.amount",
                cfg.prune.amount,
                f"not with optim.name={cfg.optim.name}: a schedule-free "
                "optimizer keeps its own copies of the weights and rebuilds the ones it trains at from them "
                "(its train/eval switch), which revives every pruned weight; use adamw or sgd",
            )
        ema = getattr(cfg, "ema", None)
        if ema is not None and ema.decay and ema.save:
            raise ConfigError(
                "ema.save",
                True,
                "not with prune.amount: an average of the weights is not sparse (the EMA is still evaluated)",
            )

    def __init__(self, run: Run):
        self.cfg: PruneConfig = run.cfg.prune
        self.pruner = Pruner(self.cfg, run.engines["model"].module, run.total_steps)

    def describe(self) -> str:
        c, names, left = self.cfg, self.pruner.names, self.pruner.left_out
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        kept = "; not pruned: " + ", ".join(f"{k} ({why})" for k, why in list(left.items())[:4]) if left else ""
        return (
            f"prune: {c.kind} to {c.amount:.0%} of {len(names)} weight matrices ({shown}), {c.schedule} from step "
            f"{c.start_step}{kept}"
        )

    def setup(self, run: Run) -> None:
        c = self.cfg
        last = c.start_step if c.schedule == "once" else c.end_step or max(c.start_step + 1, run.total_steps // 2)
        run.settled_from = max(run.settled_from, last)  # no best from before the model is pruned
        sparsity, why = self.pruner.begin(run.step)
        if why:
            run.say(f"prune: {why}")
        self._said(run, sparsity)

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.pruner.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pruner.rounds = int(state["rounds"])

    def after_step(self, run: Run, out: StepOutput) -> None:
        self._said(run, self.pruner.after_step(run.step))

    def summary(self, run: Run) -> dict[str, Any]:
        return {"sparsity": self.pruner.measure()}

    @staticmethod
    def _said(run: Run, sparsity: float | None) -> None:
        """After a pruning round: the sparsity it reached, logged and said."""
        if sparsity is not None:
            run.log({"prune/sparsity": sparsity})
            run.say(f"prune: step {run.step}, {sparsity:.2%} of the prunable weights are zero")
