"""Sharded evaluation counts every sample exactly once, also when N % world_size != 0."""

import pytest
import torch
import torch.nn as nn
from helpers import spawn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from dtrain.data import ExactShardSampler, eval_loader
from dtrain.engines.precision import AmpPrecision
from dtrain.tasks.supervised import evaluate

N = 11  # not divisible by 2 or 3


class Threshold(nn.Module):
    def forward(self, x):
        return torch.stack([-x[:, 0], x[:, 0]], 1)  # predicts class 1 iff x > 0


class AccuracyTask:
    def eval_sums(self, model, batch):
        x, y = batch
        return {"correct": (model(x).argmax(1) == y).sum(), "count": torch.tensor(len(y))}

    def eval_metrics(self, s):
        return {"accuracy": s["correct"] / s["count"], "count": s["count"]}


class FakeEngine:
    module = Threshold()
    precision = AmpPrecision("fp32", torch.device("cpu"))


def dataset() -> TensorDataset:
    x = torch.arange(N, dtype=torch.float32).unsqueeze(1) - 3  # -3..7
    y = torch.ones(N, dtype=torch.int64)
    y[-1] = 0  # the last sample is the only mistake: padding would repeat it or its neighbours
    return TensorDataset(x, y)


def _exact(rank: int, world: int) -> None:
    got = evaluate(FakeEngine(), AccuracyTask(), eval_loader(dataset(), 2, world, rank, 0), torch.device("cpu"))
    # x = -3..7 and class 1 iff x > 0: x = 1..6 right, x = 7 (label 0) wrong, x <= 0 wrong.
    assert got == {"accuracy": 6 / N, "count": N}, got
    # What torch's DistributedSampler would have done: pad with repeats, and count more than N.
    padded = DataLoader(dataset(), batch_size=2, sampler=DistributedSampler(dataset(), world, rank, shuffle=False))
    assert evaluate(FakeEngine(), AccuracyTask(), padded, torch.device("cpu"))["count"] > N


def test_exact_eval_two_ranks():
    spawn(_exact, 2)


@pytest.mark.slow
def test_exact_eval_three_ranks():
    spawn(_exact, 3)


def test_exact_shards_partition_the_indices():
    for world in (1, 2, 3, 4, 7):
        samplers = [ExactShardSampler(N, world, r) for r in range(world)]
        real = [list(s)[: s.num_real] for s in samplers]
        assert sorted(sum(real, [])) == list(range(N))  # the real indices: every sample once
        assert len({len(s) for s in samplers}) == 1  # padded: every rank as many forwards
