"""The LR the optimizer sees: scaling rule x warmup x schedule, at chosen steps."""

import math

import pytest
import torch

from dtrain.config import ConfigError, OptimConfig
from dtrain.engines.optim import build, scaled_lr


@pytest.mark.parametrize("rule,expected", [("linear", 0.4), ("sqrt", 0.2), ("none", 0.1)])
def test_scale_rules(rule, expected):
    o = OptimConfig(lr=0.1, base_batch_size=256, scale_rule=rule)
    assert scaled_lr(o, 1024) == pytest.approx(expected)
    assert scaled_lr(o, 256) == pytest.approx(0.1)


def lrs(o: OptimConfig, global_batch: int, total: int) -> list[float]:
    """The LR the optimizer actually holds at each step, by stepping a real scheduler."""
    opt, sched, _ = build(torch.nn.Linear(2, 2), o, global_batch, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine():
    o = OptimConfig(lr=0.1, base_batch_size=64, warmup_steps=10, schedule="cosine", min_lr=0.02)
    got = lrs(o, 128, 110)  # peak 0.2 by the linear rule
    assert got[0] == pytest.approx(0.2 / 10) and got[4] == pytest.approx(0.2 * 5 / 10) and got[9] == pytest.approx(0.2)
    assert got[10] == pytest.approx(0.2)  # schedule starts at the peak
    assert got[60] == pytest.approx(0.02 + (0.2 - 0.02) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert got[109] == pytest.approx(0.02 + 0.18 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    after = got[10:]
    assert all(a >= b for a, b in zip(after, after[1:]))  # cosine only decreases after warmup ...
    assert 0.02 < got[109] < 0.02 + 1e-3  # ... and the last step taken is just above min_lr


@pytest.mark.parametrize(
    "schedule,extra,checks",
    [
        ("step", {"step_size": 30, "gamma": 0.5}, {5: 0.1, 34: 0.1, 35: 0.05, 65: 0.025}),
        ("multistep", {"milestones": [10, 40], "gamma": 0.1}, {14: 0.1, 15: 0.01, 44: 0.01, 45: 0.001}),
        ("exponential", {"gamma": 0.9}, {5: 0.1, 7: 0.1 * 0.81}),
        ("linear", {"min_lr": 0.0}, {5: 0.1, 55: 0.05}),
        ("constant", {}, {5: 0.1, 99: 0.1}),
        # SGDR: cycles of 20, then 40 steps after warmup, each starting again at the peak.
        (
            "cosine_restarts",
            {"restart_steps": 20, "restart_mult": 2.0},
            {5: 0.1, 15: 0.05, 24: 0.1 * 0.5 * (1 + math.cos(math.pi * 19 / 20)), 25: 0.1, 45: 0.05, 65: 0.1},
        ),
    ],
)
def test_schedules_after_warmup(schedule, extra, checks):
    o = OptimConfig(lr=0.1, base_batch_size=100, scale_rule="sqrt", warmup_steps=5, schedule=schedule, **extra)
    got = lrs(o, 100, 105)
    assert got[2] == pytest.approx(0.1 * 3 / 5)
    for step, value in checks.items():
        assert got[step] == pytest.approx(value), (step, got[step])


def test_no_warmup_first_step_at_peak():
    o = OptimConfig(lr=0.5, base_batch_size=32, scale_rule="linear", warmup_steps=0, schedule="constant")
    assert lrs(o, 16, 3) == pytest.approx([0.25] * 3)


def test_weight_decay_skips_norms_and_biases():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt, _, _ = build(m, OptimConfig(weight_decay=0.1), 256, 10)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(m[0].weight)}
    opt, _, _ = build(m, OptimConfig(weight_decay=0.1, decay_norm_and_bias=True), 256, 10)
    assert len(opt.param_groups[0]["params"]) == 4


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop", "adagrad", "adafactor", "lars", "lamb"])
def test_every_optimizer_steps(name):
    m = torch.nn.Linear(3, 1)
    opt, sched, _ = build(m, OptimConfig(name=name, lr=0.01, weight_decay=0.01), 256, 10)
    before = m.weight.detach().clone()
    m(torch.randn(8, 3)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, m.weight)


def test_l1_adds_the_subgradient_to_matrices_only():
    from dtrain.engines.ddp import DDPEngine
    from dtrain.engines.precision import AmpPrecision

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    m = torch.nn.Linear(3, 2)
    w, b = m.weight.detach().clone(), m.bias.detach().clone()
    e = DDPEngine(
        m,
        OptimConfig(name="sgd", lr=0.1, momentum=0.0, base_batch_size=8, l1=0.01, schedule="constant"),
        precision=AmpPrecision("fp32", cpu),
        device=cpu,
        global_batch=8,
        total_steps=1,
    )
    x = torch.randn(8, 3)
    e.backward(m(x).pow(2).mean(), 1)
    gw, gb = m.weight.grad.clone(), m.bias.grad.clone()
    e.step()
    assert torch.allclose(m.weight, w - 0.1 * (gw + 0.01 * w.sign()), atol=1e-7)
    assert torch.allclose(m.bias, b - 0.1 * gb, atol=1e-7)  # no L1 on the bias


def test_plateau_drops_the_lr_after_patience_evaluations_and_resumes_with_the_checkpoint():

    o = OptimConfig(
        lr=0.1,
        base_batch_size=64,
        scale_rule="none",
        warmup_steps=2,
        schedule="plateau",
        gamma=0.5,
        plateau_patience=2,
        min_lr=0.02,
    )
    m = torch.nn.Linear(2, 1)
    opt, sched, _ = build(m, o, 64, 100)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    drops = [sched.observe({"loss": v}) for v in (1.0, 0.9, 0.95, 0.96, 0.85, 0.9, 0.91, 0.92, 0.93)]
    assert drops == [False, False, False, True, False, False, True, False, True]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)  # 0.1 x 0.5^3 = 0.0125, held at min_lr
    fresh_opt, fresh, _ = build(torch.nn.Linear(2, 1), o, 64, 100)
    fresh.load_state_dict(sched.state_dict())
    fresh_opt.step()
    fresh.step()
    assert fresh.plateau["scale"] == pytest.approx(0.125) and fresh_opt.param_groups[0]["lr"] == pytest.approx(0.02)
    with pytest.raises(ConfigError, match=r"^optim.plateau_metric='loss': not an eval metric of this task"):
        sched.observe({"accuracy": 0.5})
    assert build(m, OptimConfig(), 64, 10)[1].observe({"loss": 1.0}) is False  # other schedules ignore it


def test_a_stated_lr_is_the_lr_unless_a_base_batch_is_stated(tmp_path):
    """A user task's recipe says `lr: 1e-3` for its batch of 12: it trains at 1e-3 (the default
    used to scale it from a base batch of 256 the user never stated, to 4.69e-5). A stated base
    batch far from the run's still scales, and the run says so in a warning line."""
    from dtrain.data import BatchPlan
    from dtrain.train import report

    m = torch.nn.Linear(3, 1)
    assert build(m, OptimConfig(lr=1e-3), 12, 10)[2].peak == pytest.approx(1e-3)
    plan = BatchPlan(global_batch=12, per_rank=12, accum=1, world_size=1)
    engine = type("E", (), {"lr_info": build(m, OptimConfig(lr=1e-3, base_batch_size=256), 12, 10)[2]})()
    assert engine.lr_info.peak == pytest.approx(1e-3 * 12 / 256)
    (line,) = report.lr_warnings({"model": engine}, plan)
    assert line.startswith(
        "warning: optim.lr=0.001 is stated for a global batch of 256 (optim.base_batch_size); "
        "this run's 12 gets 4.69e-05 by the linear rule"
    ), line
    near = type("E", (), {"lr_info": build(m, OptimConfig(lr=1e-3, base_batch_size=16), 12, 10)[2]})()
    assert report.lr_warnings({"model": near}, plan) == []
