"""Typed config: every key a recipe may set, as a tree of dataclasses with types and docstrings,
and the range checks types alone do not express (`Config.validate`). Loading a recipe (YAML
plus `a.b=c` overrides, names checked with a did-you-mean, values converted to the field's
type) is `dtrain.config.recipe`. A task (see `dtrain.tasks`) extends `Config` with its own `model`
section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dtrain.errors import ConfigError as ConfigError  # (where users import it from)

# --------------------------------------------------------------------------- sections

OptimizerName = Literal[
    "sgd", "adam", "adamw", "rmsprop", "adagrad", "adafactor", "lars", "lamb", "schedulefree_adamw", "schedulefree_sgd"
]


@dataclass
class DataConfig:
    path: str = ""
    """Dataset file or folder. Empty: the task's built-in data (nothing is downloaded)."""
    global_batch_size: int = 64
    """Samples per optimizer step, summed over every rank and micro-step."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step; per-rank batch = global / (world size x this)."""
    eval_batch_size: int = 256
    """Per-rank batch size for evaluation (no gradients, so it can be large)."""
    val_fraction: float = 0.2
    """Share held out for evaluation when the dataset has no split of its own."""
    augment: bool = False
    """Task-defined light augmentation of training samples."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: load in the training process)."""
    tokens: str = ""
    """A token folder, memory-mapped (never read whole): `dtrain prepare-text`'s (train.bin,
    val.bin, meta.json) or nanoGPT's (train.bin, val.bin as uint16, meta.pkl or none). The
    Transformer reads it in place of data.path; a task of yours reads it with
    `dtrain.data.tokens.load(self.cfg.data.tokens, block, eval_blocks, self.cfg.data.vocab_size)`."""
    vocab_size: int = 0
    """The vocabulary size of a token folder without meta.json or meta.pkl (e.g. nanoGPT's
    GPT-2 BPE files: 50257). 0: read it from the folder."""


@dataclass
class TrainConfig:
    max_steps: int = 0
    """Optimizer steps to run. 0: run `train.epochs` full passes over the data."""
    epochs: int = 1
    """Passes over the training set (used when `train.max_steps` is 0)."""
    eval_every_steps: int = 0
    """Evaluate every N optimizer steps. 0: at the end of every epoch."""
    stop_at_step: int = 0
    """End this invocation after step N with a checkpoint, as a preempted job would; the LR
    schedule still spans the whole run and `resume=auto` continues it. 0: run to the end."""
    max_nonfinite_steps: int = 20
    """Consecutive optimizer steps skipped for a non-finite gradient before the run aborts."""
    collective_timeout_s: float = 600.0
    """A collective (all-reduce, barrier) that waits longer than this ends the job with an
    error naming the rank, instead of hanging forever."""


@dataclass
class ModelConfig:
    peak_tflops: float = 0.0
    """Peak bf16 TFLOP/s of one GPU, for MFU (a task with tokens: `Task.tokens_per_sample`);
    0: look the GPU up in a table of known ones."""
    sync_bn: bool = False
    """Synchronise BatchNorm statistics across ranks (torch SyncBatchNorm on CUDA,
    dtrain's differentiable all-reduce version on CPU)."""
    init: Literal["default", "kaiming", "xavier"] = "default"
    """Initialisation of every conv and linear layer: the task's own (default), Kaiming normal
    (std sqrt(2 / fan_in), for ReLU nets) or Xavier uniform; biases zero. Then the task's
    `init_weights` (e.g. `model.zero_init_residual`, `model.prior_bias`)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute each block's activations in backward instead of keeping them: `full` keeps
    only the blocks' inputs (least memory, about one more forward of compute); `selective`
    also keeps matmul and attention outputs and recomputes the cheap ops (norms, activations)."""
    init_from: str = ""
    """Start from the weights of another run: its model.pt or output_dir. Weights only (no
    optimizer, schedule or step); tensors whose name and shape match are loaded, the rest (a
    new head) keep their initialisation, and the report names both."""
    freeze: list[str] = field(default_factory=list)
    """Parameter name prefixes to keep fixed (e.g. [stem, layers]): they get no gradient and no
    optimizer state. BatchNorm running statistics in frozen parts still update in training."""


@dataclass
class OptimConfig:
    name: OptimizerName = "sgd"
    """Optimizer: torch.optim's, or pytorch_optimizer's large-batch LARS (SGD) and LAMB (Adam) and
    schedule-free AdamW / SGD (Defazio et al. 2024: evaluated and saved at their averaged weights)."""
    lr: float = 0.1
    """Peak learning rate: for the recipe's own global batch, or for `optim.base_batch_size`."""
    base_batch_size: int = 0
    """The global batch `optim.lr` is stated for: the optimizer's LR is scaled from it to the run's
    global batch by `scale_rule`. 0 (default): `lr` is for the run's global batch, used as stated."""
    scale_rule: Literal["linear", "sqrt", "none"] = "linear"
    """LR scaling with the global batch: linear (SGD), sqrt (Adam-type), none."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from ~0 to the scaled peak LR."""
    warmup_epochs: float = 0.0
    """Warmup stated in epochs (Goyal et al. use 5); when > 0 it sets warmup_steps from the
    run's steps per epoch, so runs of different global batch warm up over the same data."""
    schedule: Literal[
        "cosine", "cosine_restarts", "step", "multistep", "exponential", "linear", "constant", "plateau"
    ] = "cosine"
    """LR schedule after warmup, stepped once per optimizer step; `plateau` multiplies the LR by
    `optim.gamma` when `optim.plateau_metric` has not improved for `optim.plateau_patience` evaluations."""
    plateau_metric: str = "loss"
    """`plateau` schedule: the eval metric watched."""
    plateau_mode: Literal["min", "max"] = "min"
    """`plateau` schedule: whether lower (loss) or higher (accuracy) is better."""
    plateau_patience: int = 2
    """`plateau` schedule: evaluations without improvement before the LR drops."""
    restart_steps: int = 0
    """`cosine_restarts` (SGDR): steps of the first cosine cycle; 0: a quarter of the run."""
    restart_mult: float = 1.0
    """`cosine_restarts`: each cycle is this many times longer than the one before."""
    min_lr: float = 0.0
    """Final LR of the cosine and linear schedules (absolute, not scaled)."""
    step_size: int = 1000
    """`step` schedule: multiply by `optim.gamma` every this many steps after warmup."""
    milestones: list[int] = field(default_factory=list)
    """`multistep` schedule: steps after warmup at which the LR is multiplied by gamma."""
    gamma: float = 0.1
    """Decay factor of the step, multistep and exponential (per step) schedules."""
    momentum: float = 0.9
    """SGD, LARS and RMSprop momentum."""
    trust_coefficient: float = 0.001
    """LARS: eta in each layer's LR = lr x eta x ||w|| / (||g|| + weight_decay x ||w||)."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam / AdamW betas."""
    eps: float = 1e-8
    """Adam / AdamW / RMSprop / Adagrad epsilon."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for AdamW)."""
    decay_norm_and_bias: bool = False
    """Also decay 1-D parameters (norm weights, biases); off as usual."""
    l1: float = 0.0
    """L1 penalty on weight matrices and kernels: l1 x sign(w) is added to their reduced,
    unscaled gradient before clipping (the subgradient of l1 x |w|_1). 0: off."""
    clip_grad_norm: float = 0.0
    """Clip the all-reduced gradient to this global L2 norm. 0: off."""
    clip_grad_value: float = 0.0
    """Clamp every gradient element to [-v, v]. 0: off."""


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Track the run in MLflow (rank 0 only)."""
    uri: str = ""
    """MLflow tracking URI. Empty: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the launch directory."""
    experiment: str = "dtrain"
    """MLflow experiment; put runs you want to compare in the same one."""
    run_name: str = ""
    """MLflow run name. Empty: <recipe>-<world size>x."""
    log_every: int = 10
    """Log (console and MLflow) every N optimizer steps; values are reduced across ranks."""
    system_metrics: bool = False
    """Also log CPU / memory / GPU utilisation (MLflow system metrics)."""
    log_model: bool = False
    """Upload model.pt as an MLflow artifact (off: large models fill stores)."""
    parent_run_id: str = ""
    """Make this run a child of that MLflow run (`dtrain search` sets it for its trials)."""


@dataclass
class CheckpointConfig:
    every_steps: int | Literal["auto"] = 0
    """Save every N optimizer steps (and always at the end). 0: only at the end. `auto`: the
    interval that loses the least time to checkpoints and failures (Young/Daly:
    tau = sqrt(2 x checkpoint time x `mtbf_hours`)), from the checkpoint time measured at a
    first checkpoint after 5 steps and re-measured at each one after; printed and logged
    (`checkpoint/every_steps`)."""
    mtbf_hours: float = 0.0
    """The job's mean time between failures, for `every_steps: auto`: a node's MTBF divided by
    the number of nodes (e.g. 6,000 h per 8-GPU node: 1,024 GPUs = 128 nodes -> 47 h). 0:
    6,000 h per node / this job's nodes (from Llama 3's 419 interruptions in 54 days on 2,048
    nodes)."""
    keep: int = 2
    """How many of the newest checkpoints to keep."""
    keep_best: bool = False
    """Also keep the checkpoint of the best evaluation so far, on the task's headline metric
    (accuracy for the CNN, loss for the Transformer; `early_stop.metric` when that is set),
    marked `checkpoints/best` and never rotated away; `model.pt` stays the last weights.
    summary.json's `best` says which step and value it holds."""
    overwrite: bool = False
    """Start over (resume empty) in an output_dir that holds an earlier run's checkpoints,
    deleting them. Off: such a start stops and says how to continue or start over."""
    async_: bool = False
    """Recipe key `checkpoint.async`: copy the state to memory and write it to disk on a
    thread while training goes on (ddp, fsdp); `latest` moves only once every rank's part
    is on disk, checked before the next checkpoint and at the end."""
    trust: bool = False
    """Load DeepSpeed checkpoints from outside this run's `output_dir`. DeepSpeed reads its
    files with a full unpickle, which can run code a crafted file holds: turn this on only for
    checkpoints you or your team wrote. (Every other checkpoint kind loads without running
    code, from anywhere.)"""


@dataclass
class CheckConfig:
    """Settings of `dtrain check` (they change nothing in training)."""

    steps: int = 3
    """`--only invariance`: optimizer steps run at world size 1 and at N and compared."""
    tolerance: float = 0.0
    """`--only invariance`: the relative difference (L2 norm of the difference over the
    reference's) above which two tensors differ. 0: derived from fp32's rounding and the
    model's size, and printed."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    """ZeRO stage 0-3 when `engine=deepspeed`."""
    config: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config keys, merged over the ones dtrain derives from the recipe."""


@dataclass
class FSDPConfig:
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward and gather them again for
    backward (least memory); false keeps them until backward (one all-gather fewer per block)."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """The dtype gradients are reduce-scattered in (precision=bf16 computes in bf16; fp32
    reduction keeps the sum exact to fp32)."""
    offload: bool = False
    """Keep parameters, gradients and optimizer state in CPU memory between uses
    (`CPUOffloadPolicy`): a model that does not fit one GPU trains, at the cost of copies."""


@dataclass
class Config:
    task: str = "cnn"
    """What to train: cnn, transformer, gan, or a user task as `package.module:Class`."""
    seed: int = 0
    """Seeds model init, data order and augmentation; equal across world sizes."""
    engine: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    """Distributed engine: PyTorch DDP, DeepSpeed (ZeRO), or FSDP2 (`fully_shard` per block)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype: fp32 (off), bf16, or fp16 with a GradScaler (fsdp: bf16 through
    FSDP's MixedPrecisionPolicy, no fp16)."""
    allow_tf32: bool = True
    """CUDA on Ampere and newer: fp32 matmuls and convolutions use TF32 tensor cores (10-bit
    mantissa products, fp32 sums; several times faster). False: full fp32. No effect on CPU."""
    compile: bool = False
    """`torch.compile` the model, block by block where the task names blocks. The first steps
    compile (reported as compile_s in summary.json, not in the throughput)."""
    output_dir: str = ""
    """Where checkpoints, config.yaml, summary.json and model.pt go. Empty: runs/<recipe>. Under
    `dtrain train`, when this folder holds an earlier run, a fresh start goes to the first free
    `<folder>-2`, `-3`, ... (`resume=auto`: the newest of them with checkpoints), unless the
    command line names output_dir: such a folder is kept, and an earlier run's checkpoints in it
    are refused unless `resume` or `checkpoint.overwrite` says what to do."""
    private: bool = True
    """What the run writes (its folder, checkpoints, a local MLflow store, prepared data) is
    readable by its user alone: folders 0700, files 0600 (the umask's group and other bits set).
    False: the user's umask decides (e.g. `umask 002` for a group's shared folder)."""
    resume: str = ""
    """Empty: fresh start. `auto`: newest checkpoint in output_dir. Or a checkpoint path."""
    recipe: str = ""
    """Recipe name (the YAML file's stem); set by the loader."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    # The features' sections (`ema`, `early_stop`, `distill`, ...) are composed in beside these
    # (`compose`): each feature module owns its dataclass (`dtrain.features`).

    def validate(self) -> None:
        """Range checks that types alone do not express, this section's and every composed
        section's (`validate()` of its dataclass). Raises ConfigError."""
        positive(self.data, "data", "global_batch_size", "grad_accum_steps", "eval_batch_size")
        non_negative(self.data, "data", "num_workers")
        require("data.val_fraction", self.data.val_fraction, 0 < self.data.val_fraction < 1, "must be in (0, 1)")
        if self.data.path and not Path(self.data.path).exists():
            raise ConfigError(
                "data.path",
                self.data.path,
                "no such file or folder"
                + ("" if Path(self.data.path).is_absolute() else f" (looked in {Path.cwd()} and beside the recipe)"),
            )
        non_negative(self.train, "train", "max_steps", "eval_every_steps", "stop_at_step")
        positive(self.train, "train", "epochs", "max_nonfinite_steps", "collective_timeout_s")
        validate_optim(self.optim, "optim")
        positive(self.tracking, "tracking", "log_every")
        if self.checkpoint.every_steps != "auto":
            non_negative(self.checkpoint, "checkpoint", "every_steps")
        non_negative(self.checkpoint, "checkpoint", "mtbf_hours")
        positive(self.checkpoint, "checkpoint", "keep")
        positive(self.check, "check", "steps")
        non_negative(self.check, "check", "tolerance")
        require(
            "deepspeed.zero_stage",
            self.deepspeed.zero_stage,
            self.deepspeed.zero_stage in (0, 1, 2, 3),
            "must be 0, 1, 2 or 3",
        )
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            check: Any = getattr(section, "validate", None)
            if dataclasses.is_dataclass(section) and callable(check):
                check()
        if self.resume not in ("", "auto") and not Path(self.resume).exists():
            raise ConfigError("resume", self.resume, "no such checkpoint (use auto, a checkpoint path, or leave empty)")


_COMPOSED: dict[tuple[type, tuple[tuple[str, type], ...]], type] = {}


def compose(base: type[Config], sections: dict[str, type]) -> type[Config]:
    """`base` (a task's config class) with `sections` beside its own (the features': key ->
    dataclass), as one dataclass, the same one for the same inputs. It is registered in this
    module under a name of its own, so a config pickles (a process group's broadcast)."""
    extra = tuple((k, v) for k, v in sorted(sections.items()) if k not in {f.name for f in dataclasses.fields(base)})
    key = (base, extra)
    if key not in _COMPOSED:
        name = f"{base.__name__}With{''.join(k.title().replace('_', '') for k, _ in extra)}"
        cls = dataclasses.make_dataclass(name, [(k, v, field(default_factory=v)) for k, v in extra], bases=(base,))
        cls.__module__, cls.__qualname__ = __name__, f"_composed_{len(_COMPOSED)}_{name}"
        globals()[cls.__qualname__] = cls
        _COMPOSED[key] = cls
    return _COMPOSED[key]


def optim_sections(cfg: Any, prefix: str = "") -> list[tuple[str, OptimConfig]]:
    """Every optimizer section of a config, with its key (`optim`; a GAN's `gan.optim_g`, ...)."""
    found = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, OptimConfig):
            found.append((prefix + f.name, value))
        elif dataclasses.is_dataclass(value):
            found += optim_sections(value, f"{prefix}{f.name}.")
    return found


def validate_optim(o: OptimConfig, prefix: str) -> None:
    """Checks shared by every optimizer section (a GAN has two)."""
    require(f"{prefix}.lr", o.lr, o.lr > 0, "must be > 0")
    positive(o, prefix, "step_size")
    non_negative(o, prefix, "base_batch_size")
    non_negative(
        o,
        prefix,
        "warmup_steps",
        "warmup_epochs",
        "min_lr",
        "weight_decay",
        "clip_grad_norm",
        "clip_grad_value",
        "momentum",
    )
    require(f"{prefix}.min_lr", o.min_lr, o.min_lr <= o.lr, f"must be <= {prefix}.lr ({o.lr})")
    require(f"{prefix}.gamma", o.gamma, 0 < o.gamma <= 1, "must be in (0, 1]")
    require(f"{prefix}.betas", list(o.betas), all(0 <= b < 1 for b in o.betas), "each beta must be in [0, 1)")
    require(f"{prefix}.eps", o.eps, o.eps > 0, "must be > 0")
    require(
        f"{prefix}.milestones",
        o.milestones,
        o.milestones == sorted(set(o.milestones)) and all(m > 0 for m in o.milestones),
        "must be increasing positive step counts",
    )
    require(
        f"{prefix}.nesterov",
        o.nesterov,
        not o.nesterov or (o.name in ("sgd", "lars") and o.momentum > 0),
        "needs optim.name=sgd or lars with momentum > 0",
    )
    require(f"{prefix}.trust_coefficient", o.trust_coefficient, o.trust_coefficient > 0, "must be > 0")
    non_negative(o, prefix, "restart_steps", "l1")
    positive(o, prefix, "plateau_patience")
    require(
        f"{prefix}.schedule",
        o.schedule,
        not o.name.startswith("schedulefree") or o.schedule == "constant",
        f"must be constant with {prefix}.name={o.name} (schedule-free optimizers replace the schedule; warmup is kept)",
    )
    require(f"{prefix}.restart_mult", o.restart_mult, o.restart_mult >= 1, "must be >= 1")


def require(key: str, value: Any, ok: bool, expected: str) -> None:
    """`key=value: expected` unless `ok` (the one-line refusal of every range check)."""
    if not ok:
        raise ConfigError(key, value, expected)


def positive(section: Any, prefix: str, *names: str) -> None:
    for n in names:
        require(f"{prefix}.{n}", getattr(section, n), getattr(section, n) > 0, "must be > 0")


def non_negative(section: Any, prefix: str, *names: str) -> None:
    for n in names:
        require(f"{prefix}.{n}", getattr(section, n), getattr(section, n) >= 0, "must be >= 0")
