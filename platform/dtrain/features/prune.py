"""Pruning (`prune.*`): set a fraction of the weights to zero and keep them there while the
rest fine-tune, so the run ends with a sparse plain `model.pt`.

Which weights: every Conv and Linear weight. `torch.nn.utils.prune` chooses them, on whole
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

from typing import cast

import torch
import torch.nn as nn
from torch.nn.utils import prune

from dtrain.runtime import distributed
from dtrain.config import PruneConfig

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class _Holder(nn.Module):
    """A whole copy of one weight, for `torch.nn.utils.prune` to compute a mask on."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)


def masks_for(weights: list[torch.Tensor], amount: float, kind: str) -> list[torch.Tensor]:
    """The keep-masks (1 kept, 0 pruned) `torch.nn.utils.prune` chooses for whole `weights`."""
    holders = [_Holder(w.detach().float().cpu().clone()) for w in weights]
    if kind == "magnitude":
        prune.global_unstructured([(h, "weight") for h in holders], pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for h in holders:
            prune.ln_structured(h, "weight", amount=amount, n=2, dim=0)
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
        self.weights = [m.weight for m in module.modules() if isinstance(m, PRUNABLE)]
        self.masks: list[torch.Tensor] | None = None
        self.sparsity = 0.0

    def begin(self, step: int) -> float | None:
        """At the loop's start: round 0 on a fresh run, or the masks read back from a resumed
        run's zeros. Returns the sparsity when a round ran."""
        if step == 0 and target(self.cfg, 0, self.total_steps) is not None:
            return self.after_step(0)
        if step > self.cfg.start_step:
            self.masks = [(distributed.local_part(w.detach()) != 0).to(w.dtype) for w in self.weights]
            self.sparsity = self.measure()
        return None

    def after_step(self, step: int) -> float | None:
        """Collective under FSDP2: a pruning round if one is due (returns the sparsity), else
        the masks applied again."""
        amount = target(self.cfg, step, self.total_steps)
        if amount is not None:
            whole = [w.detach().full_tensor() if distributed.is_sharded(w) else w.detach() for w in self.weights]  # type: ignore[attr-defined]
            masks = masks_for(whole, amount, self.cfg.kind)
            self.masks = [(distributed.shard_like(m.to(w.device), w) if distributed.is_sharded(w) else m.to(w.device)).to(w.dtype)
                          for m, w in zip(masks, self.weights)]
        if self.masks is not None:
            with torch.no_grad():
                for w, m in zip(self.weights, self.masks):
                    distributed.local_part(w).mul_(m)
        if amount is None:
            return None
        self.sparsity = self.measure()
        return self.sparsity

    def measure(self) -> float:
        """Collective: the fraction of the prunable weights that are zero."""
        zeros = sum(int((distributed.local_part(w) == 0).sum()) for w in self.weights)
        count = sum(distributed.local_part(w).numel() for w in self.weights)
        if any(distributed.is_sharded(w) for w in self.weights):
            both = torch.tensor([zeros, count], dtype=torch.float64, device=self.weights[0].device)
            zeros, count = (int(x) for x in distributed.all_reduce_sum(both).tolist())
        return zeros / max(count, 1)
