"""Stochastic weight averaging (`swa.*`, dtrain.features.swa): the average is the mean of the
weights it saw, the BatchNorm statistics are those of the average, and a run stopped and
resumed on another world size ends at the straight run's average, which model.pt holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import CNN, FakeRun, load_params, max_param_diff, spawn
from torch.utils.data import DataLoader, TensorDataset

from dtrain.config import OptimConfig
from dtrain.engines.ddp import DDPEngine
from dtrain.engines.precision import AmpPrecision
from dtrain.errors import ConfigError
from dtrain.features.swa import SWA
from dtrain.protocols import StepOutput
from dtrain.tasks import Task
from dtrain.train.config import load_config

STEPPED = StepOutput(torch.zeros(()), torch.zeros(()), True)


def averaging(*overrides: str) -> tuple[SWA, FakeRun, DDPEngine]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    cpu = torch.device("cpu")
    e = DDPEngine(
        model,
        OptimConfig(name="sgd", lr=0.1),
        precision=AmpPrecision("fp32", cpu),
        device=cpu,
        global_batch=16,
        total_steps=10,
    )
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    run = FakeRun(load_config(CNN, ["tracking.enabled=false", *overrides]), {"model": e}, task=Task.__new__(Task))
    run.train_loader = DataLoader(TensorDataset(x, torch.zeros(64)), batch_size=16)
    return SWA(run), run, e


def steps(swa: SWA, run: FakeRun, e: DDPEngine, n: int) -> list[dict[str, torch.Tensor]]:
    """`n` optimizer steps, each followed by the feature's hook; the weights after each."""
    seen = []
    for i in range(n):
        x = torch.randn(16, 3, generator=torch.Generator().manual_seed(i))
        e.backward(e.model(x).pow(2).mean(), 1)
        e.step()
        run.step = i + 1
        swa.after_step(run, STEPPED)
        seen.append({k: v.detach().clone() for k, v in e.module.named_parameters()})
    return seen


def test_the_average_is_the_mean_of_the_weights_from_the_start_step():
    swa, run, e = averaging("swa.start_step=3", "swa.every_steps=2")
    seen = steps(swa, run, e, 8)
    mean = {k: torch.stack([seen[s - 1][k] for s in (3, 5, 7)]).mean(0) for k in seen[0]}
    assert swa.average.updates == 3
    assert max((swa.average.shadow[f"model.{k}"] - v).abs().max().item() for k, v in mean.items()) < 1e-6
    # The check can fail: the mean from another start is another average.
    other = {k: torch.stack([seen[s - 1][k] for s in (1, 3, 5, 7)]).mean(0) for k in seen[0]}
    assert max((swa.average.shadow[f"model.{k}"] - v).abs().max().item() for k, v in other.items()) > 1e-4


def test_at_the_end_the_model_holds_the_average_with_its_own_batchnorm_statistics():
    swa, run, e = averaging("swa.start_step=1", "swa.bn_batches=2")
    steps(swa, run, e, 4)
    expected = {k: v.clone() for k, v in swa.average.shadow.items() if "running" not in k}
    swa.end(run, "finished")
    weights = dict(e.module.named_parameters())
    assert all(torch.equal(weights[k.removeprefix("model.")], v) for k, v in expected.items())
    # BatchNorm's statistics: the mean over the two batches of the average's own activations.
    with torch.no_grad():
        hidden = [e.module[0](x) for x, _ in list(run.train_loader)[:2]]
    bn = e.module[1]
    assert torch.allclose(bn.running_mean, torch.stack([h.mean(0) for h in hidden]).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, torch.stack([h.var(0) for h in hidden]).mean(0), atol=1e-6)
    assert "model.pt holds the average of 4 steps' weights" in run.lines[-1]


def test_swa_save_is_refused_where_model_pt_would_hold_something_else():
    with pytest.raises(ConfigError, match=r"^swa.save=True: not with ema.save"):
        from dtrain.train.config import validate

        validate(load_config(CNN, ["swa.start_step=5", "ema.decay=0.9", "ema.save=true"]))


def _runs(rank: int, world: int, root: str, plan: list[tuple[str, list[str]]]) -> None:
    from dtrain.runtime.environments import DistEnv
    from dtrain.train.fit import fit

    for name, overrides in plan:
        cfg = load_config(CNN, [*SMALL, f"output_dir={Path(root) / name}", *overrides])
        fit(cfg, DistEnv(rank=rank, world_size=world, local_world_size=world), torch.device("cpu"))


SMALL = [
    "tracking.enabled=false",
    "model.widths=[8]",
    "model.blocks_per_stage=1",
    "data.augment=false",
    "train.max_steps=8",
    "checkpoint.every_steps=2",
    "train.eval_every_steps=4",
    "swa.start_step=3",
    "swa.bn_batches=3",
    "model.sync_bn=true",
    "optim.schedule=constant",
    "optim.lr=0.2",
    "data.global_batch_size=32",
]


@pytest.mark.slow
def test_stopped_and_resumed_on_another_world_size_the_run_ends_at_the_straight_runs_average(tmp_path):
    spawn(_runs, 2, str(tmp_path), [("straight", []), ("two", ["train.stop_at_step=5"])])
    spawn(_runs, 1, str(tmp_path), [("two", ["resume=auto"])])
    straight, resumed = load_params(tmp_path / "straight" / "model.pt"), load_params(tmp_path / "two" / "model.pt")
    assert max_param_diff(straight, resumed) < 1e-5  # another world size: reassociated sums only
    last = torch.load(
        tmp_path / "straight" / "checkpoints" / "step_00000008" / "model" / "state.pt", weights_only=True
    )["model"]
    assert max_param_diff(last, straight) > 1e-3  # model.pt is the average, not the last weights
