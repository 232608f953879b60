"""Reading files that may come from elsewhere without running code from them.

PyTorch's own advice for `torch.load` is to unpickle only what you trust; dtrain goes one
step further for what it can: no file format it reads runs code on load.

- Plain checkpoint parts (`trainer.pt`, DDP's `state.pt`, `model.pt`): `torch.load` with
  `weights_only=True` (`checkpoint.load_file`).
- DCP checkpoints (FSDP2 shards, `ema/`): `torch.distributed.checkpoint` reads `.metadata`
  with plain `pickle` and non-tensor values with `torch.load(weights_only=False)`. `dcp_load`
  gives it a reader whose unpickler admits only DCP's own metadata classes, and a planner that
  loads non-tensor values with `weights_only=True`; file names inside the metadata must stay
  inside the checkpoint folder.
- CIFAR-10's python pickles: `load_numpy_pickle` admits numpy arrays and plain containers.
- DeepSpeed's files can only be read by DeepSpeed's own `torch.load(weights_only=False)`:
  they are loaded only from the run's own `output_dir` or with `checkpoint.trust=true`
  (`engines.deepspeed`).

Weights meant for sharing are `model.safetensors` (the `safetensors` format holds tensors and
nothing else).
"""

from __future__ import annotations

import io
import pickle  # nosec B403 # every use goes through a restricted Unpickler (find_class allowlists)
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint import state_dict_loader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata


class UnsafeFile(ValueError):
    """A file that asked to run code, or to read outside its folder, on load."""


_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
      ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}
"""What DCP's `.metadata` pickle references (read off torch 2.13's writer): dataclasses,
an enum, torch.Size, a layout-by-name lookup and paths. None of them runs code when built."""


class _Restricted(pickle.Unpickler):
    """An Unpickler that builds only the classes in `allowed`; anything else is refused."""

    def __init__(self, file: BinaryIO, allowed: set[tuple[str, str]], what: str, **kwargs: Any):
        super().__init__(file, **kwargs)
        self.allowed, self.what = allowed, what

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeFile(f"{self.what} references {module}.{name}, which is not part of its format "
                         "(a crafted file: refused, nothing was run)")


class SafeReader(FileSystemReader):
    """DCP's file reader with the metadata unpickled by `_Restricted`, and every storage file
    it names checked to lie inside the checkpoint folder."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            metadata = _Restricted(f, _DCP_CLASSES, str(path)).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeFile(f"{path} does not hold DCP metadata")
        for info in (metadata.storage_data or {}).values():
            rel = Path(str(getattr(info, "relative_path", "")))
            if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 1:
                raise UnsafeFile(f"{path} names a storage file outside its folder ({rel}): refused")
        metadata.storage_meta = metadata.storage_meta or _storage_meta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _storage_meta() -> Any:
    from torch.distributed.checkpoint.metadata import StorageMeta

    return StorageMeta()


class SafePlanner(DefaultLoadPlanner):
    """DCP's default planner, loading non-tensor values (ints, floats, strings, optimizer
    hyperparameters) with `weights_only=True` instead of a plain unpickle."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeFile(f"a value of {read_item.dest_index.fqn} is not plain data: "
                             f"{str(e).strip().splitlines()[0][:160]}") from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes places it
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def dcp_load(state: dict[str, Any], folder: Path, no_dist: bool = False) -> None:
    """`state_dict_loader.load` of `folder` into `state` (in place), with nothing unpickled
    beyond DCP's own metadata classes and plain values. Any failure (a crafted file, a
    truncated shard, another model's keys) is an Exception whose `first_cause` is one line."""
    try:
        state_dict_loader.load(state, storage_reader=SafeReader(folder), planner=SafePlanner(), no_dist=no_dist)
    except CheckpointException as e:  # a BaseException: an `except Exception` would let it through
        raise RuntimeError(first_cause(e)) from None


def first_cause(e: BaseException) -> str:
    """The first line of what went wrong in a DCP call (its CheckpointException names every
    rank's failure; the first is enough), short enough for one line."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) else inner
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):  # load_state_dict's header
        lines = lines[1:]
    return (f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__)[:300]


_NUMPY_CLASSES = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}


def load_numpy_pickle(path: Path) -> Any:
    """A pickle of numpy arrays, lists, dicts and strings (CIFAR's python format), without
    building any other class (`encoding="bytes"`, as the format's own reader does)."""
    with open(path, "rb") as f:
        return _Restricted(f, _NUMPY_CLASSES, str(path), encoding="bytes").load()


def load_plain_pickle(path: Path) -> Any:
    """A pickle of builtin values only (dicts, lists, strings, numbers: nanoGPT's meta.pkl),
    built without looking up any class or function, so nothing it names can run."""
    with open(path, "rb") as f:
        return _Restricted(f, set(), str(path)).load()


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """A state_dict as safetensors, atomically (tied tensors are written once per name: a
    safetensors file shares no storage, and `load_state_dict` ties them again)."""
    from safetensors.torch import save_file

    from dtrain.fileio import atomic_write

    plain = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(plain, str(tmp)))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from `model.safetensors` (tensors only by format) or a `model.pt`
    (`torch.load(weights_only=True)`); errors as ValueError / OSError with the cause."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise ValueError(str(e)) from None
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        raise ValueError("not a state_dict")
    return loaded


PREPROCESSING = "preprocessing.safetensors"
"""Beside a run's model.safetensors: the task's `preprocessing()` tensors (`dtrain.load`)."""


def weights_file(folder: Path) -> Path:
    """The weights of a run's output folder: `model.safetensors`, else `model.pt`."""
    return folder / "model.safetensors" if (folder / "model.safetensors").is_file() else folder / "model.pt"


def is_own(folder: Path, output_dir: str) -> bool:
    """`folder` lies inside this run's `output_dir` (where only this run's jobs write)."""
    try:
        return Path(folder).resolve().is_relative_to(Path(output_dir).resolve())
    except OSError:
        return False

