"""Knowledge distillation (`distill.*`): the student's loss mixes its task loss with how far its
outputs are from a teacher's (Hinton, Vinyals & Dean 2015).

- `kind: logits`: alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)), per sample
  (per token for a sequence model: the logits are flattened to (..., classes)). T^2 keeps the
  soft term's gradient at the hard term's scale as T changes.
- `kind: features`: the mean squared error between the outputs of named modules of the two
  (`distill.layers: [student.module=teacher.module, ...]`, FitNets' hint layers); shapes must agree.

The teacher is a finished run (any architecture and task class, read from its own
config.yaml: nothing in its folder runs code) or a weights file of the student's architecture.
It runs in eval mode without gradients on every rank, inside the step's autocast; under
`engine=fsdp` it is sharded like the student (`fully_shard` per block), so a large teacher
costs each rank 1/world of its memory; otherwise every rank holds a replica.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from dtrain.checkpoint import safeload
from dtrain.config.schema import require
from dtrain.errors import ConfigError
from dtrain.protocols import Feature, Run
from dtrain.runtime import distributed
from dtrain.tasks.runs import FOREIGN_TASK, open_run
from dtrain.tasks.supervised import evaluate_model


@dataclass
class DistillConfig:
    teacher: str = ""
    """The model to learn from: a finished run's output_dir (its own architecture and task, read
    from its config.yaml) or a weights file (model.safetensors / model.pt) of the student's
    architecture. Empty: no distillation."""
    temperature: float = 4.0
    """Both models' logits are divided by this before the softmax (Hinton et al. 2015)."""
    alpha: float = 0.9
    """loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * task loss (T^2 keeps the soft
    term's gradients at the hard term's scale as T changes)."""
    kind: Literal["logits", "features"] = "logits"
    """logits: match the output distributions (per token for a sequence model); features: match
    the outputs of the modules `distill.layers` names (mean squared error)."""
    layers: list[str] = field(default_factory=list)
    """kind=features: `student.module=teacher.module` pairs, e.g. `layers.3=layers.3`."""

    def validate(self) -> None:
        require(
            "distill.teacher",
            self.teacher,
            not self.teacher or Path(self.teacher).exists(),
            "no such run folder or weights file",
        )
        require("distill.temperature", self.temperature, self.temperature > 0, "must be > 0")
        require("distill.alpha", self.alpha, 0 < self.alpha <= 1, "must be in (0, 1]")
        require(
            "distill.layers",
            self.layers,
            self.kind == "logits"
            or (bool(self.layers) and all(x.count("=") == 1 and all(x.split("=")) for x in self.layers)),
            "needs `student.module=teacher.module` pairs with distill.kind=features",
        )


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), averaged over the samples (rows of the flattened logits);
    with `mask`, over the rows it keeps (a sequence model's positions that are not padding)."""
    s = student.float().reshape(-1, student.size(-1)) / temperature
    t = teacher.float().reshape(-1, teacher.size(-1)) / temperature
    if mask is not None:
        keep = mask.reshape(-1).to(s.device)
        s, t = s[keep], t[keep]
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")
    return kl * temperature**2


class Teacher:
    """The teacher model on this rank, in eval mode, without gradients."""

    def __init__(self, cfg: Any, student_task: Any, device: torch.device):
        where = Path(cfg.distill.teacher)
        if where.is_dir():  # a run: its own task and architecture
            _, self.task, model = open_run(where, key="distill.teacher", allowed={cfg.task}, hint=FOREIGN_TASK)
        else:  # weights of the student's architecture
            self.task, model = student_task, student_task.inference_model()
            try:
                model.load_state_dict(safeload.load_weights(where))
            except Exception as e:  # another model's file, a checkpoint of another kind
                raise ConfigError(
                    "distill.teacher",
                    str(where),
                    f"does not fit the student's architecture "
                    f"({str(e).splitlines()[0][:200]}); give a run folder for another architecture",
                ) from None
        if not hasattr(self.task, "outputs"):
            raise ConfigError(
                "distill.teacher",
                str(where),
                f"its task ({type(self.task).__name__}) has no outputs() "
                "to distill from: a task with one model and a loss (dtrain.tasks.Task)",
            )
        model.requires_grad_(False)
        self.model = model.to(device).eval()
        if cfg.engine == "fsdp":
            self._shard(cfg)

    def _shard(self, cfg: Any) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        from dtrain.engines.fsdp import shard

        mesh = init_device_mesh(self.model_device.type, (distributed.world_size(),))
        shard(self.model, getattr(self.task, "blocks", lambda m: [])(self.model), cfg, mesh, keep_root=False)

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def outputs(self, batch: Any) -> torch.Tensor:
        out: torch.Tensor = self.task.outputs(self.model, batch)  # type: ignore[attr-defined]
        return out


class Taps:
    """Forward hooks that keep the outputs of the modules `distill.layers` names, in both models."""

    def __init__(self, pairs: list[str], student: nn.Module, teacher: nn.Module):
        self.pairs = [tuple(p.split("=")) for p in pairs]
        self.kept: dict[str, torch.Tensor] = {}
        for i, (s, t) in enumerate(self.pairs):
            for side, model, name in (("s", student, s), ("t", teacher, t)):
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    names = sorted({n.split(".")[0] for n, _ in model.named_modules() if n})
                    raise ConfigError(
                        "distill.layers",
                        f"{s}={t}",
                        f"the {'student' if side == 's' else 'teacher'} "
                        f"has no module {name!r} (its modules: {', '.join(names)})",
                    ) from None
                module.register_forward_hook(self._keep(f"{side}{i}"))

    def _keep(self, key: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.kept[key] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def loss(self) -> torch.Tensor:
        terms = []
        for i, (s, t) in enumerate(self.pairs):
            a, b = self.kept.pop(f"s{i}"), self.kept.pop(f"t{i}")
            if a.shape != b.shape:
                raise ConfigError(
                    "distill.layers",
                    f"{s}={t}",
                    f"outputs differ in shape: student "
                    f"{list(a.shape)}, teacher {list(b.shape)}; pair modules of equal output shape",
                )
            terms.append(F.mse_loss(a.float(), b.float()))
        return torch.stack(terms).mean()


class Distiller:
    """The distillation term of the student's loss (`Objective` calls it in the step)."""

    def __init__(self, cfg: Any, task: Any, student: nn.Module, device: torch.device):
        self.cfg = cfg.distill
        for hook in ("outputs", "output_loss"):
            if not hasattr(task, hook):
                raise ConfigError(
                    "distill.teacher",
                    self.cfg.teacher,
                    f"the task {type(task).__name__} has no "
                    f"{hook}(): distillation needs a task with outputs() and output_loss() (dtrain.tasks.Task)",
                )
        self.task, self.teacher = task, Teacher(cfg, task, device)
        self.taps = Taps(self.cfg.layers, student, self.teacher.model) if self.cfg.kind == "features" else None

    def check(self, task: Any, student: nn.Module, batch: Any) -> None:
        """Before training: both models on one batch; outputs that do not match are refused in one line."""
        with torch.no_grad(), _eval(student):
            s, t = task.outputs(student, batch), self.teacher.outputs(batch)
            if self.taps is not None:
                self.taps.loss()
        if self.cfg.kind == "logits" and s.shape != t.shape:
            raise ConfigError(
                "distill.teacher",
                self.cfg.teacher,
                f"its outputs {list(t.shape)} do not match the "
                f"student's {list(s.shape)} on one batch (another number of classes or vocabulary?)",
            )

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """The soft term for the student's `outputs` on `batch` (the teacher runs here)."""
        teacher = self.teacher.outputs(batch)
        if self.taps is not None:
            return self.taps.loss()
        return kd_loss(outputs, teacher, self.cfg.temperature, self.task.output_mask(batch))


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class Distill(Feature):
    key, config_class, order, needs_outputs = "distill", DistillConfig, 50, True
    requires = {
        "supervised": "distillation needs a task with one model and a loss (dtrain.Task); a GAN has two "
        "models and its own step"
    }
    matrix = {"distill": ("distill.teacher={init}", "distill.alpha=0.5")}

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return bool(cfg.distill.teacher)

    @classmethod
    def switch(cls, cfg: Any) -> tuple[str, Any]:
        return "distill.teacher", cfg.distill.teacher

    def __init__(self, run: Run):
        self.cfg: DistillConfig = run.cfg.distill
        self.distiller = Distiller(run.cfg, run.task, run.engines["model"].module, run.device)
        self.teacher_eval: dict[str, float] = {}

    def setup(self, run: Run) -> None:
        """Both models on one batch (outputs that do not match: one line), and the teacher's
        evaluation (collective), logged beside the student's curves from the start."""
        from dtrain.data import move, start

        engine = run.engines["model"]
        self.distiller.check(run.task, engine.module, move(next(start(run.eval_loader)), run.device))
        teacher = self.distiller.teacher
        self.teacher_eval = evaluate_model(
            teacher.model, teacher.task, run.eval_loader, run.device, engine.precision.autocast
        )
        run.log({f"teacher/{k}": v for k, v in self.teacher_eval.items()})

    def describe(self) -> str:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in self.teacher_eval.items())
        return (
            f"distill: teacher {self.cfg.teacher} ({type(self.distiller.teacher.model).__name__}; eval {shown}), "
            f"{self.cfg.kind}, T {self.cfg.temperature:g}, alpha {self.cfg.alpha:g}"
        )

    def loss(
        self, loss: torch.Tensor, outputs: torch.Tensor | None, batch: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert outputs is not None
        soft = self.distiller.loss(outputs, batch)
        mixed = (1 - self.cfg.alpha) * loss + self.cfg.alpha * soft
        return mixed, {"task_loss": loss.detach().float(), "distill_loss": soft.detach().float()}

    def summary(self, run: Run) -> dict[str, Any]:
        return {"teacher_eval": self.teacher_eval}
