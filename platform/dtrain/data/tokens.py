"""Token files: a corpus encoded once, on disk, memory-mapped by every rank and worker.

nanoGPT's layout: `train.bin` and `val.bin`, each a flat array of token ids. Two folders of it
are read as they are:

- `dtrain prepare-text TEXT... --output DIR` writes uint16 ids (uint32 past 65,536 symbols) in
  its own character vocabulary, where id 0 is kept for characters the vocabulary has not seen,
  and `meta.json`: {"dtype", "vocab": [...characters by id...], "train_tokens", "val_tokens"}.
- nanoGPT's own `prepare.py` writes uint16 ids and, for its character datasets, `meta.pkl`
  ({"vocab_size", "itos", "stoi"}: read without building any class, so it runs nothing), or no
  metadata at all for GPT-2 BPE ids (then `data.vocab_size` says how many there are).

`data.tokens=DIR` trains the Transformer recipe on either; `load` gives any task the same
blocks. Nothing is read into memory up front: a sample is the `block_size + 1` tokens at one
offset, read through `np.memmap` when the loader asks for it, so a corpus larger than RAM trains
(the page cache keeps what is hot), and the sampler's offsets, checkpointed mid-epoch, resume
exactly.
"""

from __future__ import annotations

import json
import os
import pickle  # nosec B403 # only its UnpicklingError: meta.pkl is read by safeload's restricted unpickler
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dtrain.errors import ConfigError
from dtrain.runtime.files import atomic_write

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
            files += sorted(_walk(item, suffixes))
        else:
            raise ConfigError(key, str(item), "no such file or folder")
    return files


def _walk(folder: Path, suffixes: set[str]) -> Iterator[Path]:
    """Every file under `folder` with one of `suffixes`, never entering a site-packages folder
    (os.walk, pruned: a listing of the standard library in ~0.1 s instead of 1.6)."""
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "site-packages"]
        for name in names:
            path = Path(root, name)
            if path.suffix in suffixes and path.is_file():
                yield path


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


def prepare(
    inputs: Sequence[str | os.PathLike[str]],
    output: Path,
    val_fraction: float = 0.1,
    max_chars: int = 0,
    show_progress: bool = True,
    tokenizer: str = "",
) -> dict[str, Any]:
    """Two streaming passes (count and collect the characters; encode and append), then the
    three files written atomically. Returns meta.json's content. `tokenizer`: a locally saved
    Hugging Face tokenizer (folder or tokenizer.json) encodes instead of the character
    vocabulary; meta.json then names it and its size (`hf` extra)."""
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
    encode, size = _encoder(vocab, tokenizer)
    dtype = np.uint16 if size <= np.iinfo(np.uint16).max + 1 else np.uint32
    _make_folder(output)
    _encode_splits(files, max_chars, split, total, encode, dtype, output, show_progress)
    counts = {name: (output / name).stat().st_size // np.dtype(dtype).itemsize for name in ("train.bin", "val.bin")}
    meta = {
        "dtype": np.dtype(dtype).name,
        "train_tokens": counts["train.bin"],
        "val_tokens": counts["val.bin"],
        "sources": [str(f) for f in files],
    }
    meta.update(
        {"tokenizer": str(Path(tokenizer).resolve()), "vocab_size": size} if tokenizer else {"vocab": vocab.chars}
    )
    atomic_write(output / "meta.json", lambda p: p.write_text(json.dumps(meta)))
    return meta


def _encode_splits(
    files: list[Path],
    max_chars: int,
    split: int,
    total: int,
    encode: Any,
    dtype: Any,
    output: Path,
    show_progress: bool,
) -> None:
    """The second pass: the text's ids into train.bin up to character `split`, the rest into
    val.bin, written beside and renamed into place once whole."""
    from tqdm import tqdm

    tmp = {name: output / f".{name}.tmp" for name in ("train.bin", "val.bin")}
    seen = 0
    try:
        with (
            tmp["train.bin"].open("wb") as train,
            tmp["val.bin"].open("wb") as val,
            tqdm(
                total=total, desc="prepare-text: encode", unit="char", unit_scale=True, disable=not show_progress
            ) as bar,
        ):
            for chunk in _chunks(files, max_chars):
                cut = max(0, min(len(chunk), split - seen))  # the split falls between characters
                for part, out in ((chunk[:cut], train), (chunk[cut:], val)):
                    if part:
                        out.write(np.fromiter(encode(part), dtype=dtype).tobytes())
                seen += len(chunk)
                bar.update(len(chunk))
    except BaseException:  # a full disk, Ctrl-C, a file changed between the passes: no half files left
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    for name, path in tmp.items():
        os.replace(path, output / name)


def _make_folder(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("--output", str(output), f"cannot be created: {e.strerror or e}") from None


def _encoder(vocab: Vocab, tokenizer: str) -> tuple[Callable[[str], Iterable[int]], int]:
    """(text -> ids, how many ids there are): the character vocabulary's, or the tokenizer's."""
    if not tokenizer:
        return (lambda text: (vocab.index[c] for c in text)), len(vocab)
    from dtrain.runtime.optional import tokenizer as load_tokenizer

    hf = load_tokenizer(tokenizer, key="--tokenizer")
    return (lambda text: hf(text, add_special_tokens=False)["input_ids"]), len(hf)


@dataclass
class TokenData:
    """A token folder's blocks and what its ids mean."""

    train: TokenBlocks
    """Every offset of train.bin."""
    val: TokenBlocks
    """Non-overlapping blocks of val.bin (at most `eval_blocks`)."""
    vocab_size: int
    chars: list[str] | None
    """The character of each id, when the folder says (None: BPE ids without metadata)."""
    unk: bool
    """Id 0 is `dtrain prepare-text`'s slot for unseen characters (`Vocab`'s layout)."""


def load(folder: str | os.PathLike[str], block: int, eval_blocks: int, vocab_size: int = 0) -> TokenData:
    """`data.tokens`: dtrain's or nanoGPT's token folder (see the module's docstring)."""
    path = Path(folder)
    for name in ("train.bin", "val.bin"):
        if not (path / name).is_file():
            raise ConfigError(
                "data.tokens",
                str(folder),
                f"has no {name} (write the folder with "
                "`dtrain prepare-text TEXT... --output DIR`, or nanoGPT's prepare.py)",
            )
    chars, dtype, unk = _vocabulary(path, vocab_size)
    if chars is None and not vocab_size and (path / "meta.json").is_file():  # ids of a tokenizer
        vocab_size = int(read_meta(path)["vocab_size"])
    size = len(chars) if chars is not None else vocab_size
    train = TokenBlocks(path / "train.bin", dtype, block)
    val = TokenBlocks(path / "val.bin", dtype, block, stride=block, limit=eval_blocks)
    if len(train) == 0 or len(val) == 0:
        raise ConfigError(
            "data.tokens",
            str(folder),
            f"too few tokens ({train.n_tokens} train, {val.n_tokens} val) for model.block_size={block}",
        )
    return TokenData(train, val, size, chars, unk)


def _vocabulary(path: Path, vocab_size: int) -> tuple[list[str] | None, str, bool]:
    """(characters by id or None, the ids' dtype, whether id 0 is UNK) from meta.json, meta.pkl
    or `data.vocab_size`."""
    from dtrain.checkpoint.safeload import UnsafeFile, load_plain_pickle

    if (path / "meta.json").is_file():
        meta = read_meta(path)
        if meta.get("tokenizer") and meta.get("vocab_size"):  # `prepare-text --tokenizer`: ids only
            return None, str(meta["dtype"]), False
        if not meta.get("vocab") or meta["vocab"][0] != UNK:
            raise ConfigError(
                "data.tokens",
                str(path),
                "meta.json's vocab is not a character vocabulary written by `dtrain prepare-text`",
            )
        return list(meta["vocab"]), str(meta["dtype"]), True
    if (path / "meta.pkl").is_file():
        try:
            meta = load_plain_pickle(path / "meta.pkl")
            itos = meta["itos"]
            chars = [str(itos[i]) for i in range(int(meta["vocab_size"]))]
        except (UnsafeFile, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as e:
            raise ConfigError(
                "data.tokens",
                str(path),
                f"meta.pkl is not nanoGPT's character metadata ({{'vocab_size', 'itos', 'stoi'}}): {e}",
            ) from None
        return chars, "uint16", False
    if vocab_size > 0:
        return None, "uint16", False
    raise ConfigError(
        "data.tokens",
        str(path),
        "has no meta.json (dtrain prepare-text) or meta.pkl (nanoGPT's "
        "character datasets); for ids without either (GPT-2 BPE: 50257), "
        "give data.vocab_size",
    )


def read_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((Path(folder) / "meta.json").read_text())
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
        chunk = torch.from_numpy(self._data[o : o + self.block + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class Vocab:
    """Characters by id. `unk` (dtrain's layout): id 0 is kept for characters it has not seen;
    off, the ids are the given list's (nanoGPT's meta.pkl; placeholders for BPE ids)."""

    def __init__(self, chars: list[str], unk: bool = True):
        self.unk = unk
        self.chars = [UNK] + [c for c in chars if c != UNK] if unk else list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def of(cls, data: TokenData) -> Vocab:
        """A token folder's vocabulary."""
        if data.chars is None:
            return cls.ids_only(data.vocab_size)
        return cls(data.chars[1:], unk=True) if data.unk else cls(data.chars, unk=False)

    @classmethod
    def ids_only(cls, size: int) -> Vocab:
        """Ids whose text is unknown (BPE ids without metadata): each prints as <id>."""
        return cls([f"<{i}>" for i in range(size)], unk=False)

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index.get(c, 0) for c in text], dtype=torch.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def __len__(self) -> int:
        return len(self.chars)
