"""Where the loop is: `TrainState`, saved in every checkpoint and restored on resume."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """Where the loop is: saved in every checkpoint, restored on resume."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    """Loader batches of this epoch consumed per rank. Since per-rank batch x world size is
    the global batch / accumulation, this count means the same samples at any world size."""
    samples_seen: int = 0
    initial_loss: float = float("nan")
    run_id: str = ""
    train_time_s: float = 0.0
    world_size: int = 0
    """Ranks that wrote the checkpoint (0: unknown, an older checkpoint)."""
    global_batch: int = 0
    grad_accum: int = 0
    resumed_from_run: str = ""
    """The MLflow run a run resumed into a new `output_dir` started from (its own run is new)."""

    @classmethod
    def saved(cls, state: dict[str, Any]) -> TrainState:
        """The state a checkpoint holds (keys of older versions it does not know are left out)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in known})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
