"""LARS and LAMB (`optim.name=lars|lamb`, pytorch_optimizer's) against updates computed by hand
on a two-parameter model: a 1x2 weight (which takes the trust ratio) and a bias (which does not)."""

import io

import pytest
import torch
import torch.nn as nn
from helpers import CNN

from dtrain.config import ConfigError, OptimConfig
from dtrain.engines import optim
from dtrain.train.config import load_config

W, B = torch.tensor([[0.5, -1.0]]), torch.tensor([0.2])
GW, GB = torch.tensor([[0.1, 0.3]]), torch.tensor([0.05])


class TwoParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(W.clone()), nn.Parameter(B.clone())


def run(o: OptimConfig, steps: int = 2) -> TwoParams:
    model = TwoParams()
    opt, _, _ = optim.build(model, o, global_batch=256, total_steps=10)  # the LR as stated
    for _ in range(steps):
        model.w.grad, model.b.grad = GW.clone(), GB.clone()
        opt.step()
    return model


def test_lars_matches_the_hand_computed_update():
    lr, m, eta, wd = 0.5, 0.9, 0.02, 0.01
    model = run(OptimConfig(name="lars", lr=lr, momentum=m, trust_coefficient=eta, weight_decay=wd))
    w, b, vw, vb = W.clone(), B.clone(), torch.zeros(1, 2), torch.zeros(1)
    for _ in range(2):
        trust = eta * w.norm() / (GW.norm() + wd * w.norm())  # the layer's own LR factor
        vw = m * vw + trust * (GW + wd * w)
        w = w - lr * vw
        vb = m * vb + GB  # the bias: plain SGD with momentum, no trust ratio, no decay
        b = b - lr * vb
    assert torch.allclose(model.w, w, atol=1e-6) and torch.allclose(model.b, b, atol=1e-6)
    # The check can fail: plain SGD with momentum moves the weight elsewhere.
    assert not torch.allclose(run(OptimConfig(name="sgd", lr=lr, momentum=m, weight_decay=wd)).w, w, atol=1e-3)


def test_lamb_matches_the_hand_computed_update():
    lr, (b1, b2), eps, wd = 0.1, (0.9, 0.999), 1e-6, 0.01
    model = run(OptimConfig(name="lamb", lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd))
    w, b = W.clone(), B.clone()
    mom = {"w": torch.zeros(1, 2), "b": torch.zeros(1)}
    sq = {"w": torch.zeros(1, 2), "b": torch.zeros(1)}
    for t in (1, 2):
        for name, g, decay in (("w", GW, wd), ("b", GB, 0.0)):
            mom[name] = b1 * mom[name] + (1 - b1) * g
            sq[name] = b2 * sq[name] + (1 - b2) * g * g
            p = (w if name == "w" else b) * (1 - lr * decay)  # decoupled weight decay
            r = mom[name] / (sq[name].sqrt() + eps)
            trust = p.norm() / (r.norm() + eps) if name == "w" else 1.0  # none for the bias
            p = p - lr / (1 - b1**t) * trust * r  # the first moment bias-corrected
            w, b = (p, b) if name == "w" else (w, p)
    assert torch.allclose(model.w, w, atol=1e-5) and torch.allclose(model.b, b, atol=1e-5)
    # The check can fail: Adam (no trust ratio) moves the weight elsewhere.
    assert not torch.allclose(run(OptimConfig(name="adamw", lr=lr, betas=(b1, b2), eps=eps)).w, w, atol=1e-3)


def test_the_trust_coefficient_is_checked():
    with pytest.raises(ConfigError, match=r"^optim.trust_coefficient=0.0: must be > 0"):
        load_config(CNN, ["optim.name=lars", "optim.trust_coefficient=0"])
    assert load_config(CNN, ["optim.name=lars", "optim.nesterov=true"]).optim.nesterov


def test_refused_where_the_trust_ratio_would_be_wrong_or_fail(tmp_path):
    from helpers import run_dtrain

    proc = run_dtrain(
        [
            "train",
            CNN,
            "optim.name=lars",
            "engine=fsdp",
            "train.max_steps=1",
            "tracking.enabled=false",
            f"output_dir={tmp_path}/o",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("dtrain: error: optim.name='lars': not with engine=fsdp")


def sf_engine():
    from dtrain.engines.ddp import DDPEngine
    from dtrain.engines.precision import AmpPrecision

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    return DDPEngine(
        nn.Linear(3, 2),
        OptimConfig(name="schedulefree_adamw", lr=0.01, base_batch_size=8, schedule="constant", betas=(0.9, 0.999)),
        precision=AmpPrecision("fp32", cpu),
        device=cpu,
        global_batch=8,
        total_steps=10,
    )


def sf_step(e, i):
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(i))
    e.backward(e.model(x).pow(2).mean(), 1)
    e.step()


def test_schedule_free_evaluates_the_average_and_trains_on_and_resumes_exactly():
    e = sf_engine()
    for i in range(3):
        sf_step(e, i)
    y = {n: p.detach().clone() for n, p in e.module.named_parameters()}
    z = {n: e.optimizer.state[p]["z"].clone() for n, p in e.module.named_parameters()}
    with e.evaluation_weights():  # x = y + (1 - 1/beta1) (z - y): the averaged point
        for n, p in e.module.named_parameters():
            assert torch.allclose(p, y[n] + (1 - 1 / 0.9) * (z[n] - y[n]), atol=1e-7)
            assert not torch.allclose(p, y[n], atol=1e-5)
    assert all(torch.allclose(p, y[n], atol=1e-7) for n, p in e.module.named_parameters())  # back to y
    buffer = io.BytesIO()  # through a file, as a checkpoint goes (tensors and plain values only)
    torch.save(e.state_dict(), buffer)
    buffer.seek(0)
    resumed = sf_engine()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    sf_step(e, 3)
    sf_step(resumed, 3)
    assert all(torch.equal(a, b) for a, b in zip(e.module.parameters(), resumed.module.parameters()))


def test_schedule_free_replaces_the_schedule():
    with pytest.raises(
        ConfigError,
        match=r"^optim.schedule='cosine': must be constant with "
        r"optim.name=schedulefree_sgd",
    ):
        load_config(CNN, ["optim.name=schedulefree_sgd", "optim.nesterov=false"])
