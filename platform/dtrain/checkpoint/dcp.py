"""Reading `torch.distributed.checkpoint` folders (FSDP2 shards, `ema/`) without running code.

DCP reads `.metadata` with plain `pickle` and non-tensor values with
`torch.load(weights_only=False)`. `dcp_load` gives it a reader whose unpickler admits only
DCP's own metadata classes, and a planner that loads non-tensor values with
`weights_only=True`; file names inside the metadata must stay inside the checkpoint folder.
(Apart from `dtrain.checkpoint.safeload`, so that a job that reads no DCP folder never imports DCP.)
"""

from __future__ import annotations

import io
import logging
import pickle  # nosec B403 # only its UnpicklingError: the metadata goes through safeload's restricted Unpickler
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import state_dict_loader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

from dtrain.checkpoint.safeload import UnsafeFile, _Restricted

_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}
"""What DCP's `.metadata` pickle references (read off torch 2.13's writer): dataclasses,
an enum, torch.Size, a layout-by-name lookup and paths. None of them runs code when built."""


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
            raise UnsafeFile(
                f"a value of {read_item.dest_index.fqn} is not plain data: {str(e).strip().splitlines()[0][:160]}"
            ) from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes places it
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def dcp_load(state: dict[str, Any], folder: Path, no_dist: bool = False) -> None:
    """`state_dict_loader.load` of `folder` into `state` (in place), with nothing unpickled
    beyond DCP's own metadata classes and plain values. Any failure (a crafted file, a
    truncated shard, another model's keys) is an Exception whose `first_cause` is one line."""
    root, quiet = logging.getLogger(), _QuietFallback()
    root.addFilter(quiet)
    try:
        state_dict_loader.load(state, storage_reader=SafeReader(folder), planner=SafePlanner(), no_dist=no_dist)
    except CheckpointException as e:  # a BaseException: an `except Exception` would let it through
        raise RuntimeError(first_cause(e)) from None
    finally:
        root.removeFilter(quiet)


class _QuietFallback(logging.Filter):
    """DCP's loader logs a metadata file it cannot read with its traceback, twice (through the
    root logger: once for the global file, once for the rank-local fallback), then raises: what
    it raises becomes the one line a refused file gets, without the tracebacks before it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.pathname.endswith("state_dict_loader.py"))


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
