"""Character-level decoder-only Transformer LM (nanoGPT-shaped), LayerNorm or RMSNorm.

Data: any text file or folder of text files (`data.path`); by default the Python standard
library's own source, found from the running interpreter, so nothing is downloaded. The
last `data.val_fraction` of the text is held out; the vocabulary is built from the
training part (unseen characters map to index 0) and saved with checkpoints and model.pt.
A training sample is the block starting at a given offset: DistributedSampler shuffles
the offsets and gives every rank different ones, so no two ranks see the same block in a step.
"""

from __future__ import annotations

import json
import math
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from dtrain import safeload, tokens
from dtrain.checkpoint import ResumeRefused
from dtrain.config import Config, ConfigError, DataConfig, ModelConfig, OptimConfig, OptimizerName
from dtrain.norm import make_norm
from dtrain.protocols import Engine
from dtrain.tasks import Task

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".json", ".csv", ".html", ".xml", ".yaml", ".yml"}
UNK = "\x00"

# Dense bf16 peak FLOP/s of known GPUs (model FLOPs utilisation); `train.peak_tflops` overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}


@dataclass
class TextDataConfig(DataConfig):
    max_chars: int = 3_000_000
    """Read at most this many characters of the corpus (0: all of it)."""
    eval_blocks: int = 256
    """Held-out blocks scored at each evaluation (non-overlapping, from the held-out text)."""
    val_fraction: float = 0.1
    global_batch_size: int = 64
    tokens: str = ""
    """A folder written by `dtrain prepare-text` (train.bin, val.bin, meta.json): memory-mapped,
    never read whole, so the corpus may be larger than RAM. Replaces data.path and max_chars."""


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
    peak_tflops: float = 0.0
    """Peak bf16 TFLOP/s of one GPU for MFU; 0: look the GPU up in a table of known ones."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing of the training loss (evaluation reports the plain loss)."""


@dataclass
class TransformerOptimConfig(OptimConfig):
    name: OptimizerName = "adamw"
    lr: float = 1e-3
    base_batch_size: int = 64
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


# --------------------------------------------------------------------------- data


def default_corpus() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_text(path: Path, max_chars: int) -> str:
    """A file, or every text file under a folder in sorted order (deterministic)."""
    files = tokens.text_files([path], TEXT_SUFFIXES, key="data.path")
    parts, total = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if max_chars and total >= max_chars:
            break
    text = "".join(parts)
    return text[:max_chars] if max_chars else text


class Vocab:
    def __init__(self, chars: list[str]):
        self.chars = [UNK] + [c for c in chars if c != UNK]
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls(sorted(set(text)))

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index.get(c, 0) for c in text], dtype=torch.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def __len__(self) -> int:
        return len(self.chars)


class Blocks(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Sample i: (tokens[o:o+T], tokens[o+1:o+T+1]) with o = i * stride."""

    def __init__(self, tokens: torch.Tensor, block: int, stride: int = 1, limit: int = 0):
        self.tokens, self.block, self.stride = tokens, block, stride
        n = (len(tokens) - block - 1) // stride + 1
        self.n = min(n, limit) if limit else n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        o = i * self.stride
        chunk = self.tokens[o:o + self.block + 1]
        return chunk[:-1], chunk[1:]


# --------------------------------------------------------------------------- model


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels (RoFormer) of x: (B, H, T, D)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, m: TransformerModelConfig):
        super().__init__()
        self.n_head, self.dropout = m.n_head, m.dropout
        self.qkv = nn.Linear(m.n_embd, 3 * m.n_embd, bias=False)
        self.proj = nn.Linear(m.n_embd, m.n_embd, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        if rope is not None:
            q, k = rotary(q, *rope), rotary(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        out: torch.Tensor = self.proj(y.transpose(1, 2).reshape(b, t, c))
        return out


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, m: TransformerModelConfig):
        super().__init__()
        self.norm1, self.norm2 = make_norm(m.norm, m.n_embd), make_norm(m.norm, m.n_embd)
        self.attn = Attention(m)
        self.mlp = nn.Sequential(nn.Linear(m.n_embd, 4 * m.n_embd, bias=False), nn.GELU(),
                                 nn.Linear(4 * m.n_embd, m.n_embd, bias=False), nn.Dropout(m.dropout))
        self.drop = nn.Dropout(m.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class CharTransformer(nn.Module):
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, m: TransformerModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = m
        self.tok = nn.Embedding(vocab_size, m.n_embd)
        self.pos = nn.Embedding(m.block_size, m.n_embd) if m.pos == "learned" else None
        self.drop = nn.Dropout(m.dropout)
        self.blocks = nn.ModuleList(Block(m) for _ in range(m.n_layer))
        self.norm = make_norm(m.norm, m.n_embd)
        self.head = nn.Linear(m.n_embd, vocab_size, bias=False)
        if m.tie_weights:
            self.head.weight = self.tok.weight
        if m.pos == "rotary":
            d = m.n_embd // m.n_head
            inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
            ang = torch.outer(torch.arange(m.block_size).float(), inv)
            self.register_buffer("rope_cos", ang.cos(), persistent=False)
            self.register_buffer("rope_sin", ang.sin(), persistent=False)
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer). Small
        # logits at init give a loss of ~ln(vocab): the recipe's first sanity check.
        self.n_params = sum(p.numel() for p in self.parameters())  # before any ZeRO-3 partitioning
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * m.n_layer))

    @staticmethod
    def _init(mod: nn.Module) -> None:
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            nn.init.normal_(mod.weight, 0.0, 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        x = self.tok(idx)
        if self.pos is not None:
            x = x + self.pos(torch.arange(t, device=idx.device))
        rope = (self.rope_cos[:t], self.rope_sin[:t]) if self.pos is None else None
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope)
        logits: torch.Tensor = self.head(self.norm(x))
        return logits

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the weights plus the attention scores (PaLM, app. B)."""
        m = self.cfg
        n = self.n_params - (m.block_size * m.n_embd if m.pos == "learned" else 0)
        return 6 * n + 12 * m.n_layer * m.n_embd * m.block_size

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int, temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
        for _ in range(new_tokens):
            logits = self(idx[:, -self.cfg.block_size:])[:, -1, :] / max(temperature, 1e-6)
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits, -1), 1)], dim=1)
        return idx


def gpu_peak_flops(device_name: str) -> float:
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return 0.0


# --------------------------------------------------------------------------- task


class TransformerTask(Task):
    config_class = TransformerConfig
    cfg: TransformerConfig
    causal = True

    def datasets(self) -> tuple[Dataset[Any], Dataset[Any]]:
        d, m = self.cfg.data, self.cfg.model
        if d.tokens:  # a prepared token folder, memory-mapped
            chars, train_blocks, val_blocks = tokens.load(d.tokens, m.block_size, d.eval_blocks)
            self.vocab, self.chars = Vocab(chars[1:]), train_blocks.n_tokens + val_blocks.n_tokens
            return train_blocks, val_blocks
        text = read_text(Path(d.path) if d.path else default_corpus(), d.max_chars)
        split = int(len(text) * (1 - d.val_fraction))
        if split < m.block_size + 2 or len(text) - split < m.block_size + 2:
            raise ConfigError("data.path", d.path or str(default_corpus()),
                              f"too little text ({len(text)} characters) for model.block_size={m.block_size}")
        self.vocab = Vocab.from_text(text[:split])
        train, val = self.vocab.encode(text[:split]), self.vocab.encode(text[split:])
        self.chars = len(text)
        return Blocks(train, m.block_size), Blocks(val, m.block_size, stride=m.block_size, limit=d.eval_blocks)

    def build_model(self) -> CharTransformer:
        self.model_ref = CharTransformer(self.cfg.model, len(self.vocab))
        return self.model_ref

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        # Embeddings, final norm and the (tied) head join the root; a subclass's own model has none.
        return list(model.blocks) if isinstance(model, CharTransformer) else []

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1),
                               label_smoothing=self.cfg.model.label_smoothing)

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = model(x).float()
        return {"nll_sum": F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="sum"),
                "tokens": torch.tensor(y.numel(), device=y.device)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        nats = sums["nll_sum"] / sums["tokens"]
        return {"loss": nats, "bpc": nats / math.log(2), "perplexity": math.exp(nats)}

    def train_metrics(self, logged: dict[str, float]) -> dict[str, float]:
        tokens_per_s = logged["train/samples_per_s"] * self.cfg.model.block_size
        out = {"train/bpc": logged["train/loss"] / math.log(2), "train/tokens_per_s": tokens_per_s}
        mfu = self.mfu(tokens_per_s)
        if mfu is not None:
            out["train/mfu"] = mfu
        return out

    def mfu(self, tokens_per_s: float) -> float | None:
        if not torch.cuda.is_available():
            return None
        peak = self.cfg.model.peak_tflops * 1e12 or gpu_peak_flops(torch.cuda.get_device_name())
        if not peak:
            return None
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return tokens_per_s / world * self.model_ref.flops_per_token() / peak

    def extra_state(self) -> dict[str, Any]:
        return {"vocab": self.vocab.chars}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """The model's embedding rows index the checkpoint's vocabulary: a corpus whose
        vocabulary differs would silently map characters to other rows."""
        saved = state.get("vocab")
        if saved is not None and list(saved) != list(self.vocab.chars):
            raise ResumeRefused(f"data.path={self.cfg.data.path or str(default_corpus())!r}: its vocabulary "
                                f"({len(self.vocab.chars)} characters) differs from the checkpoint's ({len(saved)}); "
                                "resume on the text the run was trained on")

    def summary_extras(self, summary: dict[str, Any]) -> dict[str, Any]:
        tokens_per_s = (summary["throughput"] or 0.0) * self.cfg.model.block_size
        out = {"vocab_size": len(self.vocab), "corpus_chars": self.chars, "tokens_per_s": tokens_per_s,
               "init_loss_expected": math.log(len(self.vocab)), "parameters": self.model_ref.n_params}
        mfu = self.mfu(tokens_per_s)
        if mfu is not None:
            out["mfu"] = mfu
        return out

    def describe_input(self, x: torch.Tensor) -> str | None:
        return self.vocab.decode(x.tolist())

    def generate_text(self, run_dir: Path, prompt: str, tokens: int, temperature: float, top_k: int,
                      seed: int) -> str:
        """`dtrain sample`: continue `prompt` with the run's weights (model.safetensors, else
        model.pt) and vocab.json."""
        weights = safeload.weights_file(run_dir)
        for path in (weights, run_dir / "vocab.json"):
            if not path.exists():
                raise ConfigError("run", str(run_dir), f"has no {path.name} (is the run finished?)")
        vocab = Vocab(json.loads((run_dir / "vocab.json").read_text())[1:])
        model = CharTransformer(self.cfg.model, len(vocab))
        model.load_state_dict(safeload.load_weights(weights))
        model.eval()
        torch.manual_seed(seed)
        idx = vocab.encode(prompt or "\n").unsqueeze(0)
        return vocab.decode(model.generate(idx, tokens, temperature, top_k)[0].tolist())

    def write_artifacts(self, out_dir: Path, engines: dict[str, Engine]) -> list[Path]:
        """vocab.json beside model.pt, so `dtrain sample` needs nothing else."""
        path = out_dir / "vocab.json"
        path.write_text(json.dumps(self.vocab.chars))
        return [path]
