"""Fine-tuning: start from another run's weights (`model.init_from`) and train only part of the
model (`model.freeze`).

`init_from` loads weights only, never an optimizer, a schedule or a step: the run starts at
step 0 with its own recipe. Tensors are matched by name and shape, so a new head (another
number of classes) keeps its fresh initialisation; what was not loaded, and what the file held
that the model has no place for, is printed on rank 0 (the PyTorch `load_state_dict(strict=False)`
report, plus shape mismatches, which PyTorch would refuse outright).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from dtrain.checkpoint import safeload
from dtrain.errors import ConfigError
from dtrain.runtime import distributed


def _short(names: Sequence[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def init_from(model: nn.Module, path: str) -> str:
    """Copy the tensors of `path` (a model.pt, or a run's output_dir holding one) into `model`
    wherever name and shape agree; returns the one-line report (also printed on rank 0)."""
    file = safeload.weights_file(Path(path)) if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ConfigError(
            "model.init_from", path, "no such file: a model.safetensors or model.pt, or a run's output_dir holding one"
        )
    try:
        saved = safeload.load_weights(file)  # no code runs: safetensors, or torch.load(weights_only=True)
    except Exception as e:  # a checkpoint of another kind, a truncated file
        raise ConfigError(
            "model.init_from", path, f"cannot be read as a state_dict: {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise ConfigError("model.init_from", path, "is not a plain state_dict (a model.pt of a dtrain run is)")
    own = model.state_dict()
    loaded = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    if not loaded:
        raise ConfigError(
            "model.init_from",
            path,
            f"no tensor matches the model by name and shape (file: {_short(list(saved))}; model: {_short(list(own))})",
        )
    model.load_state_dict(loaded, strict=False)
    reshaped = [f"{k} {list(saved[k].shape)}->{list(own[k].shape)}" for k in own if k in saved and k not in loaded]
    kept = [k for k in own if k not in saved]
    unused = [k for k in saved if k not in own]
    report = (
        f"model.init_from={path}: loaded {len(loaded)} of {len(own)} tensors (weights only)"
        + (f"; new shape, kept at init: {_short(reshaped)}" if reshaped else "")
        + (f"; not in the file, kept at init: {_short(kept)}" if kept else "")
        + (f"; in the file, unused: {_short(unused)}" if unused else "")
    )
    if distributed.is_main():
        print(report, flush=True)
    return report


def freeze(model: nn.Module, prefixes: Sequence[str]) -> int:
    """requires_grad=False on every parameter named `prefix` or `prefix.*`; returns how many.
    Engines hand only trainable parameters to the optimizer and to DDP's gradient reduction."""
    if not prefixes:
        return 0
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            top = sorted({n.split(".")[0] for n in names})
            raise ConfigError("model.freeze", prefix, f"names no parameter; the model's modules are {', '.join(top)}")
    frozen = [p for n, p in model.named_parameters() if any(n == f or n.startswith(f + ".") for f in prefixes)]
    if len(frozen) == len(names):
        raise ConfigError("model.freeze", list(prefixes), "freezes every parameter: nothing would train")
    for p in frozen:
        p.requires_grad_(False)
    return len(frozen)
