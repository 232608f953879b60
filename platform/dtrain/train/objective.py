"""What a recipe adds to a supervised task's own loss, and to its weights after each step:
distillation from a teacher (`dtrain.features.distill`), the EWC penalty toward an old run
(`dtrain.features.ewc`) and pruning (`dtrain.features.prune`). `build` makes them from the recipe once the
engines exist; `Objective.loss` is what the step (`dtrain.tasks.supervised.train_step`) calls instead
of `task.loss` when there is one.

Which combinations run is decided before launch: these need a task with one model (not the
GAN; `Config.validate`), and EWC and pruning change parameters in place, which DeepSpeed's
flattened ZeRO partitions do not expose (`DeepSpeedEngine.validate` refuses them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dtrain.runtime import distributed
from dtrain.tasks import supervised
from dtrain.config import Config
from dtrain.data import move, start
from dtrain.features.distill import Distiller
from dtrain.features.ewc import EWC
from dtrain.protocols import Engine
from dtrain.features.prune import Pruner


@dataclass
class Objective:
    """The loss terms beside the task's: `loss` returns the total and each term (to log)."""

    distiller: Distiller | None = None
    ewc: EWC | None = None
    alpha: float = 0.0

    def loss(self, task: Any, engine: Engine, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms: dict[str, torch.Tensor] = {}
        if self.distiller is None:
            loss = task.loss(engine.model, batch)
        else:
            out = task.outputs(engine.model, batch)
            hard, soft = task.output_loss(out, batch), self.distiller.loss(out, batch)
            loss = (1 - self.alpha) * hard + self.alpha * soft
            terms |= {"task_loss": hard.detach().float(), "distill_loss": soft.detach().float()}
        if self.ewc is not None:
            penalty = self.ewc.penalty()
            loss = loss + penalty
            # Sharded: each rank holds a part; the logged value is averaged over ranks, so x world.
            terms["ewc_penalty"] = penalty.detach().float() * (distributed.world_size() if self.ewc.sharded else 1)
        return loss, terms


@dataclass
class Combined:
    """What `build` made: the objective (None: the task's loss alone), the pruner, and the
    teacher's evaluation (logged beside the student's)."""

    objective: Objective | None = None
    pruner: Pruner | None = None
    teacher_eval: dict[str, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


def build(cfg: Config, task: Any, engines: dict[str, Engine], eval_loader: Any, device: torch.device,
          total_steps: int) -> Combined:
    """Collective (the teacher's evaluation, the Fisher, FSDP2's slicing): every rank calls it."""
    made = Combined()
    if not (cfg.distill.teacher or cfg.ewc.from_ or cfg.prune.amount):
        return made
    engine = engines["model"]
    distiller = ewc = None
    if cfg.distill.teacher:
        distiller = Distiller(cfg, task, engine.module, device)
        distiller.check(task, engine.module, move(next(start(eval_loader)), device))
        made.teacher_eval = supervised.evaluate_model(distiller.teacher.model, distiller.teacher.task, eval_loader, device,
                                                 engine.precision.autocast)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in made.teacher_eval.items())
        made.lines.append(f"distill: teacher {cfg.distill.teacher} ({type(distiller.teacher.model).__name__}; "
                          f"eval {shown}), {cfg.distill.kind}, T {cfg.distill.temperature:g}, alpha {cfg.distill.alpha:g}")
    if cfg.ewc.from_:
        ewc = EWC(cfg, engine.module, device)
        made.lines.append(ewc.describe())
    if distiller is not None or ewc is not None:
        made.objective = Objective(distiller, ewc, cfg.distill.alpha)
    if cfg.prune.amount:
        made.pruner = Pruner(cfg.prune, engine.module, total_steps)
        made.lines.append(f"prune: {cfg.prune.kind} to {cfg.prune.amount:.0%} of {len(made.pruner.weights)} weights, "
                          f"{cfg.prune.schedule} from step {cfg.prune.start_step}")
    return made
