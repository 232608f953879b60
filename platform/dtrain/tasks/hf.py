"""Hugging Face `transformers` models as dtrain tasks (the `hf` extra): `task: hf_causal_lm` (any
`AutoModelForCausalLM` architecture) and `task: hf_sequence_classification`.

The model is built from a config (`model.config: {model_type: llama, hidden_size: ...}`, random
weights) or loaded from a local `save_pretrained` folder (`model.pretrained`). Nothing is
downloaded, no code from the folder runs (no `trust_remote_code`), and pickled `*.bin` weights
are refused: safetensors only.

The model's repeated layers are its blocks, for activation checkpointing, `compile` and FSDP2
units: the classes its authors list in `_no_split_modules` (what keeps a layer on one device
when transformers splits a model), found in the model, not named per architecture.

Data: a token folder (`data.tokens`, from `dtrain prepare-text`, with or without
`--tokenizer`), or a table (`data.path`: Parquet, JSON, Arrow, CSV or a `save_to_disk` folder,
`dtrain.data.tables`) whose text column is tokenised per sample by a locally saved tokenizer
(`data.tokenizer`), or whose `input_ids` column was tokenised ahead of time. A row is cut to
`model.block_size + 1` tokens; shorter rows are padded, and padding is left out of the loss.

At the end the model is also written as `hf/` in the run folder, `save_pretrained` with
safetensors and the tokenizer beside it, so `from_pretrained` loads it unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from dtrain.checkpoint import safeload
from dtrain.config import Config, DataConfig, ModelConfig
from dtrain.data import tables, tokens
from dtrain.errors import ConfigError
from dtrain.protocols import Engine
from dtrain.runtime import optional
from dtrain.tasks import Task
from dtrain.tasks.transformer.config import TransformerOptimConfig

IGNORE = -100
"""Targets the loss skips (padding): the value transformers' own losses ignore."""


@dataclass
class HFModelConfig(ModelConfig):
    pretrained: str = ""
    """A local folder written by `save_pretrained` (config.json and *.safetensors): training
    starts from its architecture and weights. Nothing is downloaded."""
    config: dict[str, Any] = field(default_factory=dict)
    """Without `pretrained`: the architecture, with random weights: `model_type` (gpt2, llama,
    qwen2, bert, ...) and that config's fields. With it: fields of its config to change (e.g.
    dropout). `vocab_size` defaults to the data's."""
    block_size: int = 128
    """Tokens per sample: the context trained on."""


@dataclass
class HFDataConfig(DataConfig):
    tokenizer: str = ""
    """A tokenizer saved locally (a `save_pretrained` folder, or a `tokenizers` tokenizer.json)
    for a table's text column; saved beside the trained model in hf/."""
    text_column: str = "text"
    """The table's column of text, tokenised per sample."""
    ids_column: str = "input_ids"
    """The table's column of token ids, where it was tokenised ahead of time (used when present)."""
    label_column: str = "label"
    """The table's column of integer class labels (`hf_sequence_classification`)."""
    eval_blocks: int = 256
    """Held-out samples scored at each evaluation (at most)."""
    val_fraction: float = 0.1


@dataclass
class HFOptimConfig(TransformerOptimConfig):
    """The Transformer recipe's AdamW defaults (sqrt rule, decay 0.1, clipping at 1), with the
    lower peak LR and shorter warmup usual for these models."""

    lr: float = 3e-4
    warmup_steps: int = 50


@dataclass
class HFConfig(Config):
    task: str = "hf_causal_lm"
    data: HFDataConfig = field(default_factory=HFDataConfig)
    model: HFModelConfig = field(default_factory=HFModelConfig)
    optim: HFOptimConfig = field(default_factory=HFOptimConfig)

    def validate(self) -> None:
        super().validate()
        m, d = self.model, self.data
        if not m.pretrained and not m.config.get("model_type"):
            raise ConfigError(
                "model.pretrained",
                "",
                "name a local save_pretrained folder, or give model.config.model_type "
                "(e.g. gpt2, llama) to build the architecture with random weights",
            )
        if m.pretrained and "model_type" in m.config:
            raise ConfigError(
                "model.config.model_type",
                m.config["model_type"],
                "comes from model.pretrained's config.json: leave it out, or leave model.pretrained empty",
            )
        if not d.tokens and not d.path:
            raise ConfigError(
                "data.path",
                "",
                "needs a table (Parquet, JSON, Arrow, CSV, a save_to_disk folder) or "
                "data.tokens a token folder (dtrain prepare-text)",
            )


class TextRows:
    """A table row as a causal-LM sample: (ids[:-1], ids[1:]) of its first block + 1 tokens,
    padded with `pad`, the padding's targets IGNORE. A picklable object, for loader workers."""

    keep_extra = 1
    """Tokens kept beyond `block`: the LM's inputs and targets are one apart."""

    def __init__(self, block: int, text_column: str, ids_column: str, tokenizer: Any, pad: int):
        self.block, self.text, self.ids, self.tokenizer, self.pad = block, text_column, ids_column, tokenizer, pad

    def ids_of(self, row: dict[str, Any]) -> list[int]:
        """The row's first block + keep_extra ids: its ids column, else its text tokenised."""
        keep = self.block + self.keep_extra
        if self.ids in row:
            return list(row[self.ids])[:keep]
        return list(self.tokenizer(row[self.text], truncation=True, max_length=keep)["input_ids"])

    def __call__(self, row: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.ids_of(row)
        n = len(ids) - 1
        x = torch.full((self.block,), self.pad, dtype=torch.int64)
        y = torch.full((self.block,), IGNORE, dtype=torch.int64)
        if n > 0:
            x[:n], y[:n] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
        return x, y


class LabelledRows(TextRows):
    """A table row as a classification sample: (ids, attention mask, label), `block` tokens."""

    keep_extra = 0

    def __init__(self, block: int, text_column: str, ids_column: str, tokenizer: Any, pad: int, label: str):
        super().__init__(block, text_column, ids_column, tokenizer, pad)
        self.label = label

    def __call__(self, row: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        ids = self.ids_of(row)
        x = torch.full((self.block,), self.pad, dtype=torch.int64)
        x[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
        mask = (torch.arange(self.block) < len(ids)).long()
        return x, mask, torch.tensor(int(row[self.label]))


class HFTask(Task):
    """What both tasks share: the model, its blocks, its tokenizer, the save_pretrained folder."""

    config_class = HFConfig
    cfg: HFConfig
    auto_class = "AutoModelForCausalLM"
    tokenizer: Any = None
    vocab_size = 0

    # ------------------------------------------------------------------ model

    def hf_config(self) -> Any:
        """The model's transformers config: the pretrained folder's, changed by `model.config`,
        or one built from `model.config` alone. No cache: training never generates."""
        m = self.cfg.model
        transformers = optional.transformers(
            "model.pretrained" if m.pretrained else "model.config", m.pretrained or m.config
        )
        fields = dict(m.config)
        if m.pretrained:
            if not (Path(m.pretrained) / "config.json").is_file():
                raise ConfigError(
                    "model.pretrained", m.pretrained, "has no config.json (a folder save_pretrained wrote)"
                )
            try:
                config = transformers.AutoConfig.from_pretrained(
                    m.pretrained, local_files_only=True, trust_remote_code=False, **fields
                )
            except (ValueError, OSError) as e:  # custom code it would have to run, a malformed config.json
                raise ConfigError(
                    "model.pretrained",
                    m.pretrained,
                    f"cannot be loaded without running code or as it is: {str(e).splitlines()[0][:200]}",
                ) from None
        else:
            model_type = fields.pop("model_type")
            if self.vocab_size:
                fields.setdefault("vocab_size", self.vocab_size)
            try:
                config = transformers.AutoConfig.for_model(model_type, **fields)
            except ValueError:
                import difflib

                close = difflib.get_close_matches(str(model_type), list(transformers.CONFIG_MAPPING.keys()), n=3)
                raise ConfigError(
                    "model.config.model_type",
                    model_type,
                    "is not an architecture this transformers "
                    f"knows{' (close: ' + ', '.join(close) + ')' if close else ''}",
                ) from None
        config.use_cache = False
        self.extra_config(config)
        if self.vocab_size > config.vocab_size:
            raise ConfigError(
                "model.config.vocab_size",
                config.vocab_size,
                f"is smaller than the data's vocabulary ({self.vocab_size} ids)",
            )
        return config

    def extra_config(self, config: Any) -> None:
        """What this task sets in the config (a classifier's labels and padding id)."""

    def build_model(self) -> nn.Module:
        transformers = optional.transformers("model.pretrained", self.cfg.model.pretrained)
        auto = getattr(transformers, self.auto_class)
        config = self.hf_config()
        if self.cfg.model.pretrained:
            from safetensors import SafetensorError

            weights = list(Path(self.cfg.model.pretrained).glob("*.safetensors"))
            if not weights:
                raise ConfigError(
                    "model.pretrained",
                    self.cfg.model.pretrained,
                    "has no *.safetensors weights (pickled *.bin files are refused: loading them can run code)",
                )
            try:
                model: nn.Module = auto.from_pretrained(
                    self.cfg.model.pretrained,
                    config=config,
                    local_files_only=True,
                    use_safetensors=True,
                    trust_remote_code=False,
                )
            except (ValueError, OSError, RuntimeError, SafetensorError) as e:  # truncated or mismatched weights
                raise ConfigError(
                    "model.pretrained",
                    self.cfg.model.pretrained,
                    f"its weights cannot be loaded: {str(e).splitlines()[0][:200]}",
                ) from None
        else:
            model = auto.from_config(config)
        self.model_ref = model
        return model

    saved_config: dict[str, Any] | None = None
    """The model's config as the run saved it (`load_preprocessing`): a finished run's model is
    built from its own folder, not from `model.pretrained`, which may be gone."""

    def inference_model(self) -> nn.Module:
        transformers = optional.transformers("model.config", self.cfg.model.config)
        if self.saved_config is not None:
            fields = dict(self.saved_config)
            config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
        else:
            config = self.hf_config()
        model: nn.Module = getattr(transformers, self.auto_class).from_config(config)
        return model

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        names = set(getattr(model, "_no_split_modules", None) or ())
        found = [m for m in model.modules() if type(m).__name__ in names]
        if found:
            return found
        lists: list[nn.ModuleList] = [
            m for m in model.modules() if isinstance(m, nn.ModuleList)
        ]  # a model that lists none
        longest = max(lists, key=lambda m: len(m), default=None)
        return list(longest) if longest is not None else []

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        logits: torch.Tensor = model(input_ids=batch[0]).logits
        return logits

    def predict(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """Text (a string or a list of them), tokenised by the tokenizer the run saved in hf/:
        for each text the probabilities of the next token after it (causal LM, (N, vocab)) or of
        each class (classifier, (N, classes)). Token ids (N, T): of the next token after each
        position ((N, T, vocab)), or of each class (no padding assumed)."""
        if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and all(isinstance(t, str) for t in inputs)):
            return torch.cat([self._predict_text(model, t) for t in ([inputs] if isinstance(inputs, str) else inputs)])
        ids = torch.as_tensor(inputs, dtype=torch.int64)
        return F.softmax(self.outputs(model, (ids, torch.ones_like(ids))).float(), dim=-1)

    run_folder: Path | None = None

    def from_run(self, folder: Path) -> None:
        self.run_folder = folder

    def _predict_text(self, model: nn.Module, text: str) -> torch.Tensor:
        """One text: cut to model.block_size tokens as training cut its rows (a causal LM keeps
        the last ones: the context of the next token), one at a time (no padding)."""
        ids = self._text_tokenizer()(text)["input_ids"]
        if not ids:
            raise ConfigError("inputs", repr(text), "a text of at least one token")
        block = self.cfg.model.block_size
        ids = ids[-block:] if self.auto_class == "AutoModelForCausalLM" else ids[:block]
        x = torch.tensor([ids], dtype=torch.int64)
        probabilities = F.softmax(self.outputs(model, (x, torch.ones_like(x))).float(), dim=-1)
        return probabilities[:, -1] if probabilities.dim() == 3 else probabilities

    def _text_tokenizer(self) -> Any:
        if self.tokenizer is None:
            folder = self.run_folder / "hf" if self.run_folder is not None else None
            if folder is None or not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
                raise ConfigError(
                    "inputs", "text", f"{folder or 'this run'} holds no tokenizer (the run had no data.tokenizer): "
                    "give token ids (N, T) instead"
                )  # fmt: skip
            self.tokenizer = optional.tokenizer(str(folder), key="run")
        return self.tokenizer

    def expected_init_loss(self, model: nn.Module, batch: Any) -> float | None:
        with torch.no_grad():
            classes = self.outputs(model, batch).shape[-1]
        return math.log(classes)

    def tokens_per_sample(self) -> int:
        return self.cfg.model.block_size

    # ------------------------------------------------------------------ data

    def open_table(self) -> tuple[Any, Any]:
        d = self.cfg.data
        train, val = tables.open_splits(d.path, d.val_fraction)
        if d.ids_column not in train.column_names:
            tables.columns(train, {"data.text_column": d.text_column}, d.path)
            if not d.tokenizer:
                raise ConfigError(
                    "data.tokenizer",
                    "",
                    f"is needed to tokenise column {d.text_column!r} of {d.path} "
                    f"(it has no {d.ids_column!r} column): a tokenizer saved locally",
                )
        if d.tokenizer:
            self.tokenizer = optional.tokenizer(d.tokenizer)
            self.vocab_size = len(self.tokenizer)
        return train, val

    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    # ------------------------------------------------------------------ outputs

    def preprocessing(self) -> dict[str, torch.Tensor]:
        """The vocabulary's size, and the model's config as JSON bytes (safetensors holds tensors)."""
        config = json.dumps(cast(Any, self.model_ref).config.to_dict()).encode()
        return {
            "vocab_size": torch.tensor(self.vocab_size),
            "config_json": torch.tensor(list(config), dtype=torch.uint8),
        }

    def load_preprocessing(self, state: dict[str, torch.Tensor]) -> None:
        self.vocab_size = int(state["vocab_size"])
        if "config_json" in state:
            self.saved_config = json.loads(bytes(state["config_json"].tolist()).decode())

    def summary_extras(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {"parameters": sum(p.numel() for p in self.model_ref.parameters()), "vocab_size": self.vocab_size}

    def write_artifacts(self, out_dir: Path, engines: dict[str, Engine]) -> list[Path]:
        """hf/: the final weights as `save_pretrained` writes them (safetensors; tied weights
        once), with the tokenizer, so `AutoModel*.from_pretrained(run/"hf")` needs nothing else."""
        model = self.inference_model()
        model.load_state_dict(safeload.load_weights(out_dir / "model.safetensors"))
        folder = out_dir / "hf"
        model.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[operator]
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(folder))
        return sorted(folder.iterdir())


class CausalLMTask(HFTask):
    """Next-token prediction: loss and perplexity over the tokens that are not padding."""

    causal = True  # `dtrain check`'s causality check applies

    def datasets(self) -> tuple[Dataset[Any], Dataset[Any]]:
        d, block = self.cfg.data, self.cfg.model.block_size
        if d.tokens:
            data = tokens.load(d.tokens, block, d.eval_blocks, d.vocab_size)
            self.vocab_size = data.vocab_size
            named = d.tokenizer or (
                tokens.read_meta(d.tokens).get("tokenizer", "")
                if data.chars is None and (Path(d.tokens) / "meta.json").is_file()
                else ""
            )
            if named:  # the tokenizer that wrote the ids (prepare-text --tokenizer) goes into hf/ too
                self.tokenizer = optional.tokenizer(named, "data.tokenizer" if d.tokenizer else "data.tokens")
            return data.train, data.val
        train, val = self.open_table()
        rows = TextRows(block, d.text_column, d.ids_column, self.tokenizer, self.pad_id())
        return tables.Rows(train, rows), tables.Rows(val, rows, limit=d.eval_blocks)

    def output_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(outputs.float().view(-1, outputs.size(-1)), batch[1].view(-1), ignore_index=IGNORE)

    def output_mask(self, batch: Any) -> torch.Tensor | None:
        mask: torch.Tensor = batch[1] != IGNORE  # a padded row's padding positions are not the text
        return mask

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        y = batch[1]
        logits = self.outputs(model, batch).float()
        return {
            "nll_sum": F.cross_entropy(
                logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE, reduction="sum"
            ),
            "tokens": (y != IGNORE).sum(),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        nats = sums["nll_sum"] / max(sums["tokens"], 1)
        return {"loss": nats, "perplexity": math.exp(min(nats, 50.0))}


class SequenceClassificationTask(HFTask):
    """A label per text: cross-entropy, accuracy. Rows come from a table (`data.path`)."""

    auto_class = "AutoModelForSequenceClassification"
    num_labels = 0

    def headline_metric(self) -> tuple[str, bool]:
        return "accuracy", True

    def extra_config(self, config: Any) -> None:
        if self.num_labels:
            config.num_labels = self.num_labels
        if config.pad_token_id is None:  # decoder classifiers read the last token before padding
            config.pad_token_id = self.pad_id()

    def datasets(self) -> tuple[Dataset[Any], Dataset[Any]]:
        d = self.cfg.data
        if not d.path:
            raise ConfigError(
                "data.path", "", "hf_sequence_classification reads a table with a text and a label column"
            )
        train, val = self.open_table()
        tables.columns(train, {"data.label_column": d.label_column}, d.path)
        labels = train.unique(d.label_column)
        if not all(isinstance(v, int) for v in labels):
            raise ConfigError("data.label_column", d.label_column, "must hold integer class labels 0..C-1")
        self.num_labels = max(labels) + 1
        rows = LabelledRows(
            self.cfg.model.block_size, d.text_column, d.ids_column, self.tokenizer, self.pad_id(), d.label_column
        )
        return tables.Rows(train, rows), tables.Rows(val, rows, limit=d.eval_blocks)

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        logits: torch.Tensor = model(input_ids=batch[0], attention_mask=batch[1]).logits
        return logits

    def output_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), batch[-1])

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        logits, y = self.outputs(model, batch).float(), batch[-1]
        return {
            "loss_sum": F.cross_entropy(logits, y, reduction="sum"),
            "correct": (logits.argmax(-1) == y).sum(),
            "count": torch.tensor(len(y)),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["loss_sum"] / sums["count"], "accuracy": sums["correct"] / sums["count"]}

    def preprocessing(self) -> dict[str, torch.Tensor]:
        return {**super().preprocessing(), "num_labels": torch.tensor(self.num_labels)}

    def load_preprocessing(self, state: dict[str, torch.Tensor]) -> None:
        super().load_preprocessing(state)
        self.num_labels = int(state["num_labels"])

    def tokens_per_sample(self) -> int:
        return 0
