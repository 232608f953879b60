"""The interfaces the rest of dtrain is written against, and nothing else.

- `Engine`: how one model is wrapped, stepped and saved (DDP, DeepSpeed, ...). The step
  (`dtrain.tasks.supervised.train_step`) and the trainer only ever call what is declared here.
- `Precision`: the autocast context of forward and, under fp16, the loss scaler: one object
  per job, shared by the engines it scales (Lightning Fabric's precision plugin).
- `Task`: what a recipe trains (data, models, loss, evaluation), with `ModelSpec` (one
  trained model) and `StepOutput` (what one training step reports).

This module imports nothing of dtrain and no heavy library at run time (torchtitan's
`protocols/`): an engine or a task can be read, type-checked and written against it alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager, Protocol

if TYPE_CHECKING:
    from concurrent.futures import Future

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class LRInfo:
    """The learning rate an optimizer really gets, as printed at start and logged."""

    peak: float
    """The scaled LR: `base` for `base_batch`, scaled to the global batch by `rule`."""
    base: float
    base_batch: int
    rule: str
    """linear, sqrt or none."""
    warmup_steps: int


@dataclass
class StepOutput:
    """What one training step reports (device tensors: no host sync inside the step)."""

    loss: torch.Tensor
    """Mean loss over the step's micro-batches on this rank."""
    grad_norm: torch.Tensor
    """Global L2 norm of the all-reduced, unscaled gradient before clipping (same on every rank)."""
    stepped: bool
    """False when the step was skipped for a non-finite gradient."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """More per-rank values to average over the log window and the ranks (e.g. a GAN's g_loss)."""


@dataclass
class ModelSpec:
    """One trained model of a task: it gets its own engine (optimizer, schedule, clipping)."""

    module: nn.Module
    optim: Any
    """Its `OptimConfig` section."""
    optimizer_steps_per_step: float = 1.0
    """Optimizer steps this model takes per training step (a GAN critic: about n_critic);
    sizes the LR schedule."""
    broadcast_buffers: bool = True
    """Let DDP copy rank 0's buffers before each forward (off when buffers stay equal anyway)."""
    blocks: list[nn.Module] = field(default_factory=list)
    """The model's repeated units (a Transformer's layers, a ResNet's residual blocks): FSDP2
    shards each as one unit, `compile` compiles each, activation checkpointing recomputes each.
    Empty: the model is one unit."""


class Precision(Protocol):
    name: str
    """fp32, bf16 or fp16."""
    scaler: torch.amp.GradScaler
    """Enabled under fp16 for engines that scale with torch.amp; disabled otherwise."""

    def autocast(self) -> ContextManager[Any]: ...
    def update(self) -> None:
        """Once per training iteration, after every optimizer it scales has stepped."""


class Checkpointed(Protocol):
    """A part of a checkpoint (an engine, the EMA): it writes and reads its own folder,
    `step_X/<name>/`; `dtrain.checkpoint` only names the folders and publishes them."""

    required: bool
    """False: a checkpoint written without this part (before it was turned on) still loads."""

    def save(self, folder: Path, background: bool = False) -> Future[Any] | None:
        """Collective: write this part's state under `folder`. `background`: return once the
        state is copied to memory, with a future that completes when it is on disk."""

    def load(self, folder: Path) -> None: ...


class LRSchedule(Protocol):
    """An engine's LR schedule (`dtrain.engines.optim.Schedule`), stepped inside `Engine.step`."""

    plateau: dict[str, float]
    """Under `optim.schedule=plateau`: "scale", the product of the drops so far."""

    def observe(self, metrics: dict[str, float]) -> bool:
        """After an evaluation: True when the LR dropped (a plateau schedule)."""


class Engine(Checkpointed, Protocol):
    name: str

    @classmethod
    def capabilities(cls, cfg: Any) -> frozenset[str]:
        """What it offers the features a recipe turns on (`Feature.requires`), under `cfg`:
        `weights` (its module's parameters hold the trained weights, whole or as shards, for
        a feature to read), `weights_in_place` (a feature may change them in place: they are
        what the optimizer steps)."""

    device: torch.device
    model: nn.Module
    """The wrapped model to call forward on in training (DDP, DeepSpeed)."""
    module: nn.Module
    """The plain model: evaluation, state_dict, model.pt."""
    precision: Precision
    lr_info: LRInfo
    lr: float
    """The LR the optimizer used for the last step."""

    @property
    def scheduler(self) -> LRSchedule:
        """The LR schedule, stepped inside `step`."""

    on_gradients: Callable[[], None] | None
    """Called inside `step` once the gradients are final (reduced and unscaled, before
    clipping and the optimizer): where `full_grads` reads them (`dtrain.features.monitor`)."""

    def no_sync(self, skip: bool) -> ContextManager[Any]:
        """Suppress the gradient all-reduce on a non-final micro-step when `skip`."""

    def backward(self, loss: torch.Tensor, micro_steps: int) -> None:
        """Backward of one of `micro_steps` micro-steps (the engine scales and divides)."""

    def step(self) -> tuple[torch.Tensor, bool]:
        """Unscale, measure the global norm, clip, check, step, schedule -> (norm, stepped).
        Never updates the loss scaler: `precision.update()` does, once per iteration."""

    def sync_buffers(self) -> None:
        """Rank 0's buffers on every rank (before evaluation and checkpoints)."""

    def evaluation_weights(self) -> ContextManager[Any]:
        """Inside: the model holds the weights to evaluate and to ship (a schedule-free
        optimizer's average); outside: the ones training continues from."""

    def loss_scale(self) -> float | None: ...
    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """A plain state_dict of the whole model, on every rank (a collective under sharding)."""

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Each parameter's whole gradient by name, in `on_gradients` (a collective under sharding)."""

    def full_params(self) -> dict[str, torch.Tensor]:
        """Each parameter's whole (fp32 master) value by name (a collective under sharding)."""


class BaseTask:
    """What the loop asks of a task. Every rank builds the same task. `dtrain.Task`
    (`dtrain.tasks.supervised.Task`) implements the supervised case (one model called `model`,
    `loss` and `eval_sums`); a task with several models (the GAN) implements `models`,
    `train_step`, `evaluate` and `final_state_dict` itself."""

    capabilities: ClassVar[frozenset[str]] = frozenset()
    """What this kind of task offers the features that need it (`Feature.requires`):
    `supervised` (one model called `model` and a loss)."""

    config_class: type = object
    """The dataclass of this task's recipe (a subclass of `dtrain.config.Config`)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def headline_metric(self) -> tuple[str, bool]:
        """The eval metric that says how good a run is, and whether higher is better: what
        `dtrain search` optimises unless `--metric` says otherwise. Default: loss, lower."""
        return "loss", False

    def datasets(self) -> tuple[Dataset[Any], Dataset[Any]]:
        """(train, eval) datasets; every rank builds the same ones."""
        raise NotImplementedError

    def models(self) -> dict[str, ModelSpec]:
        raise NotImplementedError

    def augmentation(self) -> Callable[[Any, torch.Generator], Any] | None:
        """Per-sample training augmentation, or None: a picklable `(sample, generator) -> sample`
        that draws every random number from `generator` (the sample's own stream for this
        epoch, `dtrain.data.sample_generator`). Runs where the sample is loaded (main process
        or DataLoader worker); the result is world-size invariant and resumes exactly."""
        return None

    def micro_batches_per_step(self, accum: int) -> int:
        """Loader batches one training step consumes."""
        return accum

    def train_step(
        self, engines: dict[str, Engine], micro_batches: list[Any], terms: LossTerms | None = None
    ) -> StepOutput:
        """One optimizer step of every model over `micro_batches`; `terms`: what the recipe's
        features add to the loss (a task that takes none is never given any)."""
        raise NotImplementedError

    def evaluate(self, engines: dict[str, Engine], loader: DataLoader[Any], device: torch.device) -> dict[str, float]:
        """Metrics of the whole evaluation set, the same on every rank."""
        raise NotImplementedError

    def final_state_dict(self, engines: dict[str, Engine]) -> dict[str, torch.Tensor]:
        """model.pt: a plain state_dict (collective: every rank calls it)."""
        return engines["model"].consolidated_state_dict()

    def tokens_per_sample(self) -> int:
        """Tokens in one training sample (a sequence model's context length): the loop then
        logs `train/tokens_per_s` (and `train/mfu` on a GPU of known peak), and summary.json
        `tokens_per_s` / `mfu`. 0: samples are not counted in tokens."""
        return 0

    def flops_per_token(self) -> float:
        """Training FLOPs per token for MFU. 0: estimated as 6 x the parameters (forward and
        backward of a dense model, Kaplan et al.), without attention's own FLOPs."""
        return 0.0

    def train_metrics(self, logged: dict[str, float]) -> dict[str, float]:
        """Extra metrics derived from the logged ones (e.g. bits per char, tokens/s)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Task state saved with the checkpoint (e.g. a vocabulary)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` saved (on resume); raise `ResumeRefused` if it cannot fit."""

    def summary_extras(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Extra numbers for summary.json, given the trainer's."""
        return {}

    def write_artifacts(self, out_dir: Path, engines: dict[str, Engine]) -> list[Path]:
        """Files written beside model.pt at the end (rank 0), also logged to MLflow."""
        return []

    # What a prediction from a finished run asks (`dtrain.load`, `dtrain predict`): the run's
    # folder must be enough, the training data may be gone.

    def preprocessing(self) -> dict[str, torch.Tensor]:
        """What `datasets()` learned from the data that predictions and `inference_model` need
        (input statistics, a target's scale, a vocabulary, the class count), as tensors: saved
        as preprocessing.safetensors beside model.safetensors (loading runs no code)."""
        return {}

    def load_preprocessing(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `preprocessing` saved, in place of `datasets()`."""

    def inference_model(self) -> nn.Module:
        """A fresh module that model.pt's state_dict loads into (after `load_preprocessing`)."""
        raise NotImplementedError

    def from_run(self, folder: Path) -> None:
        """The finished run's folder, given after `load_preprocessing` when the task predicts:
        for what inference reads from it besides (a tokenizer the run saved). Files only: no code."""

    def predict(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """Outputs for raw inputs, as a user holds them: the datasets' preprocessing applied
        first, the task's output form after (class probabilities, target units). Default: the
        model's outputs for inputs as the datasets hold them. Called in eval mode, no grad."""
        out: torch.Tensor = model(inputs)
        return out

    # What `dtrain check` asks beyond training; the defaults fit a task whose batches are
    # (inputs, targets) and whose one model is called `model`.

    causal: bool = False
    """Outputs at position t depend only on inputs at positions <= t (a causal LM):
    `dtrain check` then proves that no position sees the future."""

    def check_inputs(self, models: dict[str, nn.Module], batch: Any) -> dict[str, torch.Tensor]:
        """The input each model is called on, from one training batch (already on the device)."""
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        return {"model": first} if "model" in models else {}

    def describe_input(self, x: torch.Tensor) -> str | None:
        """One sample's input in readable form (e.g. decoded text); None: shown as numbers or an image."""
        return None


class Tracker(Protocol):
    """Where a run's metrics, tags and files go: MLflow on rank 0 (`dtrain.tracking`), nowhere
    on the other ranks or with tracking off. Never raises; an outage costs no training time."""

    run_id: str | None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def links(self) -> str | None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class LossTerms(Protocol):
    """What the recipe's features add to a supervised task's loss (`Feature.loss`, composed)."""

    needs_outputs: bool
    """A term needs the model's outputs (`Task.outputs`), so the step computes the loss from them."""

    def __call__(
        self, loss: torch.Tensor, outputs: torch.Tensor | None, batch: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss with every feature's term, and the terms to log (detached)."""


@dataclass
class Clock:
    """When this attempt started up, and the seconds the loop spent between steps since (every rank)."""

    began: float = 0.0
    """Unix time `fit` began (the process group up)."""
    loaded: float = 0.0
    """Unix time the checkpoint it resumed from was loaded (or found absent)."""
    eval_s: float = 0.0
    checkpoint_s: float = 0.0
    """Time training waited for checkpoints."""
    checkpoints: int = 0
    last_checkpoint_s: float = 0.0
    last_checkpoint_step: int = 0
    checkpoint_write_s: float = 0.0
    """Checkpoints' whole write time (with `checkpoint.async`, mostly behind training)."""


class Run(Protocol):
    """What a feature sees of the job it is part of (`dtrain.train.loop.Loop` is one)."""

    cfg: Any
    """The whole recipe (a feature reads its own section, `getattr(cfg, Feature.key)`)."""
    task: BaseTask
    engines: dict[str, Engine]
    device: torch.device
    total_steps: int
    global_batch: int
    world_size: int
    output_dir: Path
    train_loader: DataLoader[Any]
    """This rank's training loader (its position is the loop's: iterate a fresh `iter()`)."""
    eval_loader: DataLoader[Any]
    clock: Clock
    settled_from: int
    """The first step whose weights are of the kind the run makes: a feature that changes the
    model's kind (pruning, until its last round) raises it in setup; no evaluation before it
    is a run's best."""

    @property
    def step(self) -> int:
        """Optimizer steps done (after `resume`, the checkpoint's)."""

    @property
    def resumed(self) -> bool:
        """This attempt continues from a checkpoint."""

    def say(self, line: str) -> None:
        """A line on rank 0's console."""

    def log(self, metrics: dict[str, float]) -> None:
        """Metrics at the current step (MLflow; the same values on every rank, logged by rank 0)."""

    def evaluate(self) -> dict[str, float]:
        """Collective: the task's evaluation of the engines' current weights (as the loop's is)."""

    def report_eval(self, prefix: str, metrics: dict[str, float]) -> None:
        """An evaluation's metrics, logged as `<prefix>/<name>` and said as the loop's own are."""

    def metric_names(self) -> list[str]:
        """Collective: the eval metrics the task reports (from one evaluation batch per rank):
        a key that names one is checked against these before the first step."""

    def request_checkpoint(self, best: bool = False) -> None:
        """Write a checkpoint after this hook (`best`: mark it `checkpoints/best`)."""

    def checkpoint_folder(self, step: int) -> Path:
        """Where the checkpoint of `step` is (or will be) published."""

    def log_file(self, path: Path, folder: str = "") -> None:
        """A file the run wrote, to MLflow beside its metrics (rank 0)."""

    def load_weights(self, folder: Path) -> bool:
        """Collective: the engines and the features' saved parts from the checkpoint in `folder`;
        False (nothing loaded) when it is not there on every rank."""

    def stop(self, reason: str, halt: bool = False) -> None:
        """End training after this hook: said with `reason`; the run finishes (final evaluation,
        checkpoint, model.pt), or with `halt` only ends (a search trial its study stopped)."""


class Feature:
    """A training feature: what a recipe turns on beside the task. Each is one module in
    `dtrain/features/` holding its config section (a dataclass, `config_class`, composed into
    every recipe as `<key>.*`) and a subclass of this class, found there by
    `dtrain.features.registry()`: the loop, the schema, the checks before launch, resume and
    the combination matrix all take it from there, and nothing else names it.

    The loop, with each hook marked (`dtrain.train.loop` is this, in code):

        build the task, its data, one engine per model
        feature = Feature(run)                       # each enabled feature, by `order`
        resume: the engines, feature.load(folder), feature.load_state_dict(state)
        feature.setup(run)                           # <- SETUP (the step is known)
        until done:
            for each micro-batch of the step:        # (`dtrain.tasks.supervised.train_step`)
                loss = the task's loss
                loss, logged = feature.loss(loss, outputs, batch)   # <- LOSS
                backward
            optimizer step
            feature.after_step(run, out)             # <- AFTER_STEP
            if an evaluation is due:
                metrics = the task's evaluation
                feature.after_eval(run, metrics)     # <- AFTER_EVAL (may run.stop(...))
            if a checkpoint is due (every N steps, or a feature asked):
                the engines, feature.save(folder), feature.state_dict()
        feature.end(run, status)                     # <- END (also "failed": no collectives then)
        model.pt; summary.json with feature.summary()

    A feature resumes through `state_dict` (small state, in `trainer.pt`) and, with
    `folder_state`, `save`/`load` of a folder of its own in each checkpoint (sharded tensors:
    DCP reshards them on another world size). It says in `requires` what it needs of the
    engine and the task; a recipe that turns it on with an engine or task that lacks it is
    refused before launch, in one line with the reason.
    """

    key: ClassVar[str] = ""
    """Its recipe section (`ema` for `ema.*`); "" when it has none."""
    config_class: ClassVar[type | None] = None
    """The dataclass of its section (fields with docstrings, a `validate()` for ranges)."""
    order: ClassVar[int] = 50
    """Hooks run by increasing order (a feature that changes the weights before one that reads them)."""
    requires: ClassVar[dict[str, str]] = {}
    """Capabilities it needs of the engine (`Engine.capabilities`) or the task
    (`BaseTask.capabilities`), each with why: the refusal's words."""
    needs_outputs: ClassVar[bool] = False
    """Its `loss` reads the model's outputs (`Task.outputs`)."""
    folder_state: ClassVar[bool] = False
    """It writes a folder of its own in each checkpoint (`save`, `load`)."""
    required: bool = False
    """(`Checkpointed`) A checkpoint written before it was on still loads."""
    matrix: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Factors of the combination matrix (`tests/support/matrix.py`): a name for each way of
    turning it on, with the overrides that do so in the matrix's tiny Transformer task."""

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        """Whether the recipe turns it on."""
        return False

    @classmethod
    def switch(cls, cfg: Any) -> tuple[str, Any]:
        """The key and value that turned it on, for a refusal's line."""
        return cls.key, True

    @classmethod
    def check(cls, cfg: Any) -> None:
        """Before launch: its keys against the rest of the recipe (ConfigError); its section's
        own ranges are its dataclass's `validate()`."""

    @classmethod
    def start_weights(cls, cfg: Any) -> str:
        """A run or weights file the model starts from when `model.init_from` says nothing."""
        return ""

    def __init__(self, run: Run) -> None:
        """Built once the engines exist, before resume (what `load` fills must exist)."""

    def setup(self, run: Run) -> None:
        """After resume, before the first step: what needs the step or collectives."""

    def loss(
        self, loss: torch.Tensor, outputs: torch.Tensor | None, batch: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Inside the step, per micro-batch (supervised tasks): the loss with this feature's
        term, and what to log."""
        return loss, {}

    def after_step(self, run: Run, out: StepOutput) -> None:
        """After every optimizer step (`out.stepped` False: skipped for a non-finite gradient)."""

    def after_eval(self, run: Run, metrics: dict[str, float]) -> None:
        """After every evaluation of the weights training goes on from."""

    def end(self, run: Run, status: str) -> None:
        """Once training stopped: finished, stopped, preempted, halted (collectives allowed;
        the final checkpoint is written, model.pt not yet), or failed (no collectives)."""

    def state_dict(self) -> dict[str, Any]:
        """What resumes it: plain values and whole tensors, saved in `trainer.pt`."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save(self, folder: Path, background: bool = False) -> Future[Any] | None:
        """With `folder_state`: collective, write its tensors under `folder`."""
        return None

    def load(self, folder: Path) -> None:
        """With `folder_state`: read what `save` wrote (absent: written before it was on)."""

    def describe(self) -> str:
        """Its part of the start line ("" for none)."""
        return ""

    def summary(self, run: Run) -> dict[str, Any]:
        """Collective: its entries in summary.json (a finished run; its closing lines said here)."""
        return {}
