"""The character LM's data: text read from files (by default the standard library's own
source, so nothing is downloaded) cut into next-token blocks."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dtrain.data import tokens


def default_corpus() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_text(path: Path, max_chars: int) -> str:
    """A file, or every text file under a folder in sorted order (deterministic)."""
    files = tokens.text_files([path], tokens.TEXT_SUFFIXES, key="data.path")
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
        chunk = self.tokens[o : o + self.block + 1]
        return chunk[:-1], chunk[1:]
