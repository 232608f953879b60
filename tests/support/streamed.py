"""A user task whose training set is a stream of tar shards (`data.path`: a folder of *.tar
written by `dtrain.data.shards.write_shards`): the digits MLP of helpers.MLPTask, fed by TarShards."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from helpers import MLPTask

from dtrain.data.images import digits
from dtrain.data.shards import Sample, TarShards


def encode(x: torch.Tensor, y: int) -> Sample:
    buf = io.BytesIO()
    np.save(buf, x.numpy())
    return {"npy": buf.getvalue(), "cls": str(int(y)).encode()}


def decode(sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.load(io.BytesIO(sample["npy"]))), torch.tensor(int(sample["cls"]))


class StreamedDigitsTask(MLPTask):
    def datasets(self) -> tuple[Any, Any]:
        _, test = digits(self.cfg.data.val_fraction)  # evaluated in memory: the held-out digits
        return TarShards(sorted(Path(self.cfg.data.path).glob("*.tar")), decode), test
