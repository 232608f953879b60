"""Reading files that may come from elsewhere without running code from them.

PyTorch's own advice for `torch.load` is to unpickle only what you trust; dtrain goes one
step further for what it can: no file format it reads runs code on load.

- Plain checkpoint parts (`trainer.pt`, DDP's `state.pt`, `model.pt`): `torch.load` with
  `weights_only=True` (`checkpoint.load_file`).
- DCP checkpoints (FSDP2 shards, `ema/`): `dtrain.checkpoint.dcp.dcp_load`, with this module's
  restricted unpickler.
- CIFAR-10's python pickles: `load_numpy_pickle` admits numpy arrays and plain containers.
- DeepSpeed's files can only be read by DeepSpeed's own `torch.load(weights_only=False)`:
  they are loaded only from the run's own `output_dir` or with `checkpoint.trust=true`
  (`engines.deepspeed`).

Weights meant for sharing are `model.safetensors` (the `safetensors` format holds tensors and
nothing else).
"""

from __future__ import annotations

import pickle  # nosec B403 # every use goes through a restricted Unpickler (find_class allowlists)
from pathlib import Path
from typing import Any, BinaryIO

import torch


class UnsafeFile(ValueError):
    """A file that asked to run code, or to read outside its folder, on load."""


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
        raise UnsafeFile(
            f"{self.what} references {module}.{name}, which is not part of its format "
            "(a crafted file: refused, nothing was run)"
        )


_NUMPY_CLASSES = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


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

    from dtrain.runtime.files import atomic_write

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
