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
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from dtrain.checkpoint import safeload
from dtrain.data import tokens
from dtrain.data.tokens import Vocab as Vocab
from dtrain.errors import ConfigError, ResumeRefused
from dtrain.protocols import Engine
from dtrain.tasks import Task
from dtrain.tasks.transformer.config import TextDataConfig as TextDataConfig
from dtrain.tasks.transformer.config import TransformerConfig as TransformerConfig
from dtrain.tasks.transformer.config import TransformerModelConfig as TransformerModelConfig
from dtrain.tasks.transformer.config import TransformerOptimConfig as TransformerOptimConfig
from dtrain.tasks.transformer.data import Blocks as Blocks
from dtrain.tasks.transformer.data import default_corpus as default_corpus
from dtrain.tasks.transformer.data import read_text as read_text
from dtrain.tasks.transformer.model import Attention as Attention
from dtrain.tasks.transformer.model import CharTransformer as CharTransformer


class TransformerTask(Task):
    config_class = TransformerConfig
    cfg: TransformerConfig
    causal = True

    def datasets(self) -> tuple[Dataset[Any], Dataset[Any]]:
        d, m = self.cfg.data, self.cfg.model
        if d.tokens:  # a prepared token folder (dtrain's or nanoGPT's), memory-mapped
            data = tokens.load(d.tokens, m.block_size, d.eval_blocks, d.vocab_size)
            self.vocab, self.chars = Vocab.of(data), data.train.n_tokens + data.val.n_tokens
            return data.train, data.val
        text = read_text(Path(d.path) if d.path else default_corpus(), d.max_chars)
        split = int(len(text) * (1 - d.val_fraction))
        if split < m.block_size + 2 or len(text) - split < m.block_size + 2:
            raise ConfigError(
                "data.path",
                d.path or str(default_corpus()),
                f"too little text ({len(text)} characters) for model.block_size={m.block_size}",
            )
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

    def output_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        y = batch[1]
        return F.cross_entropy(
            outputs.float().view(-1, outputs.size(-1)), y.view(-1), label_smoothing=self.cfg.model.label_smoothing
        )

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = model(x).float()
        return {
            "nll_sum": F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="sum"),
            "tokens": torch.tensor(y.numel(), device=y.device),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        nats = sums["nll_sum"] / sums["tokens"]
        return {"loss": nats, "bpc": nats / math.log(2), "perplexity": math.exp(nats)}

    def tokens_per_sample(self) -> int:
        return self.cfg.model.block_size

    def flops_per_token(self) -> float:
        return self.model_ref.flops_per_token()  # 6N plus attention's scores (PaLM's count)

    def train_metrics(self, logged: dict[str, float]) -> dict[str, float]:
        return {"train/bpc": logged["train/loss"] / math.log(2)}

    def extra_state(self) -> dict[str, Any]:
        return {"vocab": self.vocab.chars}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """The model's embedding rows index the checkpoint's vocabulary: a corpus whose
        vocabulary differs would silently map characters to other rows."""
        saved = state.get("vocab")
        if saved is not None and list(saved) != list(self.vocab.chars):
            raise ResumeRefused(
                f"data.path={self.cfg.data.path or str(default_corpus())!r}: its vocabulary "
                f"({len(self.vocab.chars)} characters) differs from the checkpoint's ({len(saved)}); "
                "resume on the text the run was trained on"
            )

    def summary_extras(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {
            "vocab_size": len(self.vocab),
            "corpus_chars": self.chars,
            "init_loss_expected": math.log(len(self.vocab)),
            "parameters": self.model_ref.n_params,
        }

    def preprocessing(self) -> dict[str, torch.Tensor]:
        if any(len(c) != 1 for c in self.vocab.chars):  # BPE ids: only their count
            return {"vocab_size": torch.tensor(len(self.vocab))}
        return {
            "vocab": torch.tensor([ord(c) for c in self.vocab.chars], dtype=torch.int32),
            "unk": torch.tensor(self.vocab.unk),
        }

    def load_preprocessing(self, state: dict[str, torch.Tensor]) -> None:
        if "vocab_size" in state:
            self.vocab = Vocab.ids_only(int(state["vocab_size"]))
            return
        chars, unk = [chr(c) for c in state["vocab"].tolist()], bool(state["unk"])
        self.vocab = Vocab(chars[1:] if unk else chars, unk=unk)

    def predict(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """Next-character probabilities (N, T, vocab) after each position of a text, a list of
        texts of one length, or token ids (N, T); `vocab` maps them back to characters."""
        texts = [inputs] if isinstance(inputs, str) else inputs
        if isinstance(texts, list) and all(isinstance(t, str) for t in texts):
            inputs = torch.stack([self.vocab.encode(t) for t in texts])
        return F.softmax(model(torch.as_tensor(inputs, dtype=torch.int64)).float(), dim=-1)

    def describe_input(self, x: torch.Tensor) -> str | None:
        return self.vocab.decode(x.tolist())

    def generate_text(self, run_dir: Path, prompt: str, tokens: int, temperature: float, top_k: int, seed: int) -> str:
        """`dtrain sample`: continue `prompt` with the run's weights (model.safetensors, else
        model.pt) and its vocabulary (preprocessing.safetensors; vocab.json of older runs)."""
        weights = safeload.weights_file(run_dir)
        vocab_file = run_dir / safeload.PREPROCESSING
        vocab_file = vocab_file if vocab_file.exists() else run_dir / "vocab.json"
        for path in (weights, vocab_file):
            if not path.exists():
                raise ConfigError("run", str(run_dir), f"has no {path.name} (is the run finished?)")
        if vocab_file.suffix == ".json":
            self.vocab = Vocab(json.loads(vocab_file.read_text())[1:])
        else:
            self.load_preprocessing(safeload.load_weights(vocab_file))
        vocab = self.vocab
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
