"""The DDP step on 2 real gloo ranks: averaged gradients, global-norm clipping, equal replicas,
and one all-reduce per optimizer step under gradient accumulation."""

import contextlib
import copy
import gc

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from helpers import spawn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from dtrain.config import OptimConfig
from dtrain.engines.ddp import DDPEngine
from dtrain.engines.precision import AmpPrecision
from dtrain.tasks.supervised import train_step

CPU = torch.device("cpu")


class MSETask:
    def loss(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x), y)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _flat_grads(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in m.parameters()])


def _gather(t: torch.Tensor) -> torch.Tensor:
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


def _rank_batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)  # each rank has different data
    return torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g) * 5


def _allreduce_and_clip(rank: int, world: int) -> None:
    model = _model()
    ref = copy.deepcopy(model)
    max_norm, lr = 0.05, 0.1
    o = OptimConfig(name="sgd", lr=lr, base_batch_size=8 * world, momentum=0.0, clip_grad_norm=max_norm)
    engine = DDPEngine(
        model, o, precision=AmpPrecision("fp32", CPU), device=CPU, global_batch=8 * world, total_steps=10
    )
    x, y = _rank_batch(rank)

    F.mse_loss(ref(x), y).backward()  # this rank's own gradient, no communication
    expected = _gather(_flat_grads(ref)).mean(0)

    with engine.precision.autocast():
        loss = F.mse_loss(engine.model(x), y)
    engine.backward(loss, 1)
    assert torch.allclose(_flat_grads(engine.module), expected, atol=1e-6)  # DDP averaged them

    before = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    norm, stepped = engine.step()
    assert stepped and abs(norm.item() - expected.norm().item()) < 1e-5  # pre-clip norm is the global one
    assert expected.norm() > max_norm  # so clipping is active here
    clipped = expected * (max_norm / (expected.norm() + 1e-6))
    after = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    assert torch.allclose(before - lr * clipped, after, atol=1e-6)  # the update used the clipped global grad
    assert abs(clipped.norm().item() - max_norm) < 1e-6

    norms, params = _gather(norm.reshape(1)), _gather(after)
    assert torch.equal(norms[0], norms[1]) and torch.equal(params[0], params[1])  # identical replicas


@pytest.mark.slow
def test_allreduced_gradient_is_the_average_and_clipping_is_global():
    spawn(_allreduce_and_clip, 2)


def _count_allreduces(rank: int, world: int, break_no_sync: bool) -> None:
    o = OptimConfig(name="sgd", lr=0.1, base_batch_size=32)
    engine = DDPEngine(_model(), o, precision=AmpPrecision("fp32", CPU), device=CPU, global_batch=32, total_steps=10)
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        return default_hooks.allreduce_hook(state, bucket)

    engine.model.register_comm_hook(None, counting_hook)
    if break_no_sync:
        engine.no_sync = lambda skip: contextlib.nullcontext()
    x, y = _rank_batch(rank)
    micro = [(x[i * 2 : (i + 1) * 2], y[i * 2 : (i + 1) * 2]) for i in range(4)]
    train_step(engine, MSETask(), micro)
    buckets = 1  # this small model fits one DDP bucket
    assert len(calls) == (4 if break_no_sync else 1) * buckets, len(calls)
    # Drop the DDP reducer (and its Python comm hook) before the process group goes:
    # otherwise gloo can abort the process at teardown.
    del engine
    gc.collect()


@pytest.mark.slow
def test_accumulation_all_reduces_once_per_step():
    spawn(_count_allreduces, 2, False)


@pytest.mark.slow
def test_without_no_sync_every_micro_step_all_reduces():
    spawn(_count_allreduces, 2, True)


def _nonfinite_skips(rank: int, world: int) -> None:
    o = OptimConfig(name="sgd", lr=0.1, base_batch_size=16)
    engine = DDPEngine(_model(), o, precision=AmpPrecision("fp32", CPU), device=CPU, global_batch=16, total_steps=10)
    x, y = _rank_batch(rank)
    if rank == 1:
        x = x.clone()
        x[0, 0] = float("inf")  # one rank's bad sample poisons the all-reduced gradient everywhere
    before = [p.detach().clone() for p in engine.module.parameters()]
    out = train_step(engine, MSETask(), [(x, y)])
    assert not out.stepped and not torch.isfinite(out.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    assert engine.scheduler.last_epoch == 0  # the schedule did not advance


def test_nonfinite_gradient_skips_step_on_every_rank():
    spawn(_nonfinite_skips, 2)
