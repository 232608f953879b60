"""Fine-tuning example: the digits CNN of another run, re-headed for a new question (is the
digit odd?), its stem and first stage frozen. The whole task is the relabelling: everything
else (model, loss, metrics) is the built-in CNN task's."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from dtrain.tasks.cnn import CNNTask


class ParityTask(CNNTask):
    """Digits labelled 0 (even) or 1 (odd): a 2-way head where the pretrained model has 10."""

    def datasets(self) -> tuple[TensorDataset, TensorDataset]:
        train, test = super().datasets()
        relabel = [TensorDataset(ds.tensors[0], ds.tensors[1] % 2) for ds in (train, test)]
        self.num_classes = 2
        self.class_counts = torch.bincount(relabel[0].tensors[1], minlength=2)
        return relabel[0], relabel[1]
