"""The Transformer recipe's keys: data (text or a token folder), model shape, optimizer defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dtrain.config import Config, DataConfig, ModelConfig, OptimConfig, OptimizerName
from dtrain.errors import ConfigError


@dataclass
class TextDataConfig(DataConfig):
    max_chars: int = 3_000_000
    """Read at most this many characters of the corpus (0: all of it)."""
    eval_blocks: int = 256
    """Held-out blocks scored at each evaluation (non-overlapping, from the held-out text)."""
    val_fraction: float = 0.1
    global_batch_size: int = 64


@dataclass
class TransformerModelConfig(ModelConfig):
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block (n_embd must divide by it)."""
    n_embd: int = 128
    """Width of the residual stream."""
    block_size: int = 128
    """Context length in characters."""
    dropout: float = 0.1
    """Dropout on attention weights, residual branches and embeddings."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Every norm of the model: LayerNorm, or scale-only RMSNorm (torch.nn.RMSNorm)."""
    pos: Literal["learned", "rotary"] = "learned"
    """Learned absolute position embeddings, or rotary embeddings on q and k."""
    tie_weights: bool = True
    """Share the token embedding with the output projection."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing of the training loss (evaluation reports the plain loss)."""


@dataclass
class TransformerOptimConfig(OptimConfig):
    name: OptimizerName = "adamw"
    lr: float = 1e-3
    scale_rule: Literal["linear", "sqrt", "none"] = "sqrt"
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr: float = 1e-4
    clip_grad_norm: float = 1.0


@dataclass
class TransformerConfig(Config):
    task: str = "transformer"
    data: TextDataConfig = field(default_factory=TextDataConfig)
    model: TransformerModelConfig = field(default_factory=TransformerModelConfig)
    optim: TransformerOptimConfig = field(default_factory=TransformerOptimConfig)

    def validate(self) -> None:
        super().validate()
        m = self.model
        if m.n_embd % m.n_head:
            raise ConfigError("model.n_embd", m.n_embd, f"must be divisible by model.n_head ({m.n_head})")
        if m.pos == "rotary" and (m.n_embd // m.n_head) % 2:
            raise ConfigError("model.pos", m.pos, "rotary needs an even head dimension (n_embd / n_head)")
