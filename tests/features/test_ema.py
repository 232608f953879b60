"""EMA of the weights: the average equals one computed by hand, the decay is per reference
batch, evaluation swaps the average in and out exactly, and it checkpoints (DCP). The
multi-rank and resume-on-another-world-size paths run in tests/test_fsdp.py."""

import pytest
import torch
import torch.nn as nn
from helpers import CNN, LM, FakeRun

from dtrain.config import ConfigError, OptimConfig
from dtrain.engines.ddp import DDPEngine
from dtrain.engines.precision import AmpPrecision
from dtrain.features.ema import EMA
from dtrain.protocols import StepOutput
from dtrain.train.config import load_config, validate

STEPPED = StepOutput(torch.zeros(()), torch.zeros(()), True)


def averaged(e: DDPEngine, *overrides: str, global_batch: int = 512) -> EMA:
    """The EMA feature of a recipe (`optim.base_batch_size=256`) over the engine `e`."""
    cfg = load_config(CNN, ["tracking.enabled=false", "optim.base_batch_size=256", *overrides])
    return EMA(FakeRun(cfg, {"model": e}, global_batch))


def engine() -> DDPEngine:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    cpu = torch.device("cpu")
    return DDPEngine(
        model,
        OptimConfig(name="sgd", lr=0.1, base_batch_size=256),
        precision=AmpPrecision("fp32", cpu),
        device=cpu,
        global_batch=512,
        total_steps=10,
    )


def train(e: DDPEngine, ema: EMA, steps: int, decays: list[float]) -> dict[str, torch.Tensor]:
    """Step the engine, update the EMA, and keep the same average by hand with `decays[i]`."""
    tracked = {k: t for k, t in [*e.module.named_parameters(), *e.module.named_buffers()] if t.is_floating_point()}
    hand = {k: t.detach().clone() for k, t in tracked.items()}
    for i in range(steps):
        x = torch.randn(16, 3, generator=torch.Generator().manual_seed(i))
        e.backward(e.model(x).pow(2).mean(), 1)
        e.step()
        ema.after_step(FakeRun(load_config(CNN)), STEPPED)
        hand = {k: decays[i] * hand[k] + (1 - decays[i]) * tracked[k].detach() for k in hand}
    return hand


def test_average_equals_the_hand_computed_one_with_the_decay_per_reference_batch():
    e = engine()
    ema = averaged(e, "ema.decay=0.9")
    assert ema.decay == pytest.approx(0.81)  # 0.9 per 256 samples = 0.81 per step of 512
    hand = train(e, ema, 5, [0.81] * 5)
    assert max((ema.average.shadow[f"model.{k}"] - v).abs().max().item() for k, v in hand.items()) < 1e-6
    # The check can fail: the decay not rescaled to the batch is a different average.
    wrong = train(engine(), averaged(engine(), "ema.decay=0.9"), 5, [0.9] * 5)
    assert max((ema.average.shadow[f"model.{k}"] - v).abs().max().item() for k, v in wrong.items()) > 1e-3


def test_warmup_forgets_the_initial_weights_fast():
    e = engine()
    ema = averaged(e, "ema.decay=0.999", "ema.warmup=true", "ema.base_batch_size=512")
    decays = [min(0.999, (1 + n) / (10 + n)) for n in range(4)]
    hand = train(e, ema, 4, decays)
    assert (
        decays[0] == 0.1
        and max((ema.average.shadow[f"model.{k}"] - v).abs().max().item() for k, v in hand.items()) < 1e-6
    )


def test_swapped_in_for_evaluation_and_back_exactly_and_checkpointed(tmp_path):
    e = engine()
    ema = averaged(e, "ema.decay=0.5", global_batch=256)
    train(e, ema, 3, [0.5] * 3)
    live = {k: v.clone() for k, v in e.module.state_dict().items()}
    average = ema.average
    with average.swapped():
        assert torch.equal(e.module[0].weight, average.shadow["model.0.weight"])
        assert torch.equal(e.module[1].running_mean, average.shadow["model.1.running_mean"])
    assert all(torch.equal(live[k], v) for k, v in e.module.state_dict().items())

    ema.save(tmp_path / "ema")
    fresh = averaged(engine(), "ema.decay=0.5", global_batch=256)
    fresh.load(tmp_path / "ema")
    assert fresh.average.updates == 3 and all(
        torch.equal(fresh.average.shadow[k], v) for k, v in average.shadow.items()
    )


def test_refusals_are_one_line():
    with pytest.raises(ConfigError, match=r"^ema.decay=1.0: must be in \[0, 1\)"):
        load_config(LM, ["ema.decay=1.0"])
    with pytest.raises(ConfigError, match=r"^ema.decay=0.9: not with engine=deepspeed: its module holds no whole"):
        validate(load_config(LM, ["ema.decay=0.9", "engine=deepspeed", "deepspeed.zero_stage=3"]))
    with pytest.raises(ConfigError, match=r"^ema.decay=0.9: not for a GAN"):
        load_config(LM.replace("transformer_charlm", "gan_ring"), ["ema.decay=0.9"])
