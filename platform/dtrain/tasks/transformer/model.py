"""A decoder-only Transformer (nanoGPT-shaped): LayerNorm or RMSNorm, learned or rotary
positions, weight-tied head. Knows nothing of training."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dtrain.engines.norm import make_norm
from dtrain.tasks.transformer.config import TransformerModelConfig


# Dense bf16 peak FLOP/s of known GPUs (model FLOPs utilisation); `train.peak_tflops` overrides.
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
        self.mlp = nn.Sequential(
            nn.Linear(m.n_embd, 4 * m.n_embd, bias=False),
            nn.GELU(),
            nn.Linear(4 * m.n_embd, m.n_embd, bias=False),
            nn.Dropout(m.dropout),
        )
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
            logits = self(idx[:, -self.cfg.block_size :])[:, -1, :] / max(temperature, 1e-6)
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits, -1), 1)], dim=1)
        return idx
