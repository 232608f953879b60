"""Token files: a corpus encoded once, on disk, memory-mapped by every rank and worker.

nanoGPT's layout, in a folder written by `dtrain prepare-text TEXT... --output DIR`:

    train.bin   the training tokens, one after another (uint16, or uint32 past 65,536 symbols)
    val.bin     the held-out tokens (the last `--val-fraction` of the text)
    meta.json   {"dtype": "uint16", "vocab": [...characters...], "train_tokens": N, "val_tokens": M}

`data.tokens=DIR` trains the Transformer recipe on it. Nothing is read into memory up front: a
sample is the `block_size + 1` tokens at one offset, read through `np.memmap` when the loader
asks for it, so a corpus larger than RAM trains (the page cache keeps what is hot), and the
sampler's offsets, checkpointed mid-epoch, resume exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dtrain.config import ConfigError
from dtrain.fileio import atomic_write

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".json", ".csv", ".html", ".xml", ".yaml", ".yml"}
UNK = "\x00"  # index 0: characters the vocabulary has not seen
CHUNK = 1 << 20  # characters read and encoded at a time: memory stays flat on any corpus


def text_files(inputs: Sequence[str | os.PathLike[str]], suffixes: set[str], key: str = "prepare-text") -> list[Path]:
    """Each input file, and every text file under each input folder in sorted order (a folder's
    site-packages left out: the default corpus, the standard library, holds the installed ones).
    The one listing of the in-memory reader and of `dtrain prepare-text`: both see the same text."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_file():
            files.append(item)
        elif item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix in suffixes and p.is_file()
                            and "site-packages" not in p.relative_to(item).parts)
        else:
            raise ConfigError(key, str(item), "no such file or folder")
    return files


def _chunks(files: list[Path], max_chars: int) -> Iterator[str]:
    left = max_chars or -1
    for f in files:
        try:
            with f.open(encoding="utf-8") as fh:
                while left != 0 and (chunk := fh.read(CHUNK if left < 0 else min(CHUNK, left))):
                    left -= len(chunk) if left > 0 else 0
                    yield chunk
        except UnicodeDecodeError:
            continue  # not UTF-8 text: skipped, as the in-memory reader does


def prepare(inputs: Sequence[str | os.PathLike[str]], output: Path, val_fraction: float = 0.1,
            max_chars: int = 0, show_progress: bool = True) -> dict[str, Any]:
    """Two streaming passes (count and collect the characters; encode and append), then the
    three files written atomically. Returns meta.json's content."""
    from tqdm import tqdm


    if not 0.0 < val_fraction < 1.0:
        raise ConfigError("--val-fraction", val_fraction, "must be between 0 and 1 (exclusive)")
    files = text_files(inputs, TEXT_SUFFIXES)
    chars: set[str] = set()
    total = 0
    for chunk in tqdm(_chunks(files, max_chars), desc="prepare-text: scan", unit="MB", disable=not show_progress):
        chars.update(chunk)
        total += len(chunk)
    split = int(total * (1 - val_fraction))
    if split == 0 or split == total:
        raise ConfigError("prepare-text", [str(i) for i in inputs], f"too little text ({total} characters)")
    vocab = Vocab(sorted(chars))
    dtype = np.uint16 if len(vocab) <= np.iinfo(np.uint16).max + 1 else np.uint32
    lookup = vocab.index
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("--output", str(output), f"cannot be created: {e.strerror or e}") from None
    tmp = {name: output / f".{name}.tmp" for name in ("train.bin", "val.bin")}
    seen = 0
    try:
        with tmp["train.bin"].open("wb") as train, tmp["val.bin"].open("wb") as val, \
                tqdm(total=total, desc="prepare-text: encode", unit="char", unit_scale=True,
                     disable=not show_progress) as bar:
            for chunk in _chunks(files, max_chars):
                ids = np.fromiter((lookup[c] for c in chunk), dtype=dtype, count=len(chunk))
                cut = max(0, min(len(chunk), split - seen))
                train.write(ids[:cut].tobytes())
                val.write(ids[cut:].tobytes())
                seen += len(chunk)
                bar.update(len(chunk))
    except BaseException:  # a full disk, Ctrl-C, a file changed between the passes: no half files left
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    for name, path in tmp.items():
        os.replace(path, output / name)
    meta = {"dtype": np.dtype(dtype).name, "vocab": vocab.chars, "train_tokens": split, "val_tokens": total - split,
            "sources": [str(f) for f in files]}
    atomic_write(output / "meta.json", lambda p: p.write_text(json.dumps(meta)))
    return meta


def load(folder: str | os.PathLike[str], block: int, eval_blocks: int) -> tuple[list[str], "TokenBlocks", "TokenBlocks"]:
    """`data.tokens`: the folder's vocabulary (UNK first), training blocks (every offset) and
    evaluation blocks (non-overlapping, at most `eval_blocks`)."""

    meta = read_meta(folder)
    if not meta["vocab"] or meta["vocab"][0] != UNK:
        raise ConfigError("data.tokens", str(folder), "meta.json's vocab is not a character vocabulary "
                                                      "written by `dtrain prepare-text`")
    path = Path(folder)
    train = TokenBlocks(path / "train.bin", meta["dtype"], block)
    val = TokenBlocks(path / "val.bin", meta["dtype"], block, stride=block, limit=eval_blocks)
    if len(train) == 0 or len(val) == 0:
        raise ConfigError("data.tokens", str(folder), f"too few tokens ({meta['train_tokens']} train, "
                                                      f"{meta['val_tokens']} val) for model.block_size={block}")
    return list(meta["vocab"]), train, val


def read_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder)
    for name in ("meta.json", "train.bin", "val.bin"):
        if not (path / name).is_file():
            raise ConfigError("data.tokens", str(folder), f"has no {name} (write the folder with "
                                                          "`dtrain prepare-text TEXT... --output DIR`)")
    meta: dict[str, Any] = json.loads((path / "meta.json").read_text())
    return meta


class TokenBlocks(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Sample i of a token file: (tokens[o:o+T], tokens[o+1:o+T+1]) with o = i * stride, read
    through a memory map opened lazily in each process (a DataLoader worker opens its own:
    a memmap pickled to a spawned worker would be copied whole)."""

    def __init__(self, path: Path, dtype: str, block: int, stride: int = 1, limit: int = 0):
        self.path, self.dtype, self.block, self.stride = path, np.dtype(dtype), block, stride
        self.n_tokens = path.stat().st_size // self.dtype.itemsize
        n = max(0, (self.n_tokens - block - 1) // stride + 1)
        self.n = min(n, limit) if limit else n
        self._data: np.memmap[Any, Any] | None = None

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._data is None:
            self._data = np.memmap(self.path, dtype=self.dtype, mode="r")
        o = i * self.stride
        chunk = torch.from_numpy(self._data[o:o + self.block + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


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
