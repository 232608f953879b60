"""GANs across real gloo ranks: replicas stay identical (parameters and buffers), 2 ranks
match 1 rank, penalties match a hand computation, lazy R1 keeps ranks in sync, and the
offline metrics score real data well and degenerate data badly."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from helpers import ROOT, check, load_params, max_param_diff, run_dtrain, spawn

from dtrain import data
from dtrain.engines import build_engines
from dtrain.tasks import gan
from dtrain.tasks.gan import quality
from dtrain.train.config import load_config

RING = str(ROOT / "recipes" / "gan_ring.yaml")
DIGITS = str(ROOT / "recipes" / "gan_digits.yaml")


def _setup(recipe: str, overrides: list[str]):
    cfg = load_config(recipe, ["tracking.enabled=false", *overrides])
    task = gan.GANTask(cfg)
    train, _ = task.datasets()
    plan = data.plan_batches(cfg, dist.get_world_size())
    loader = data.train_loader(train, plan, dist.get_rank(), cfg.seed, 0, False)
    torch.manual_seed(cfg.seed)
    engines = build_engines(cfg, task.models(), torch.device("cpu"), plan, total_steps=100)
    return task, engines, iter(loader)


def _gather_state(module: torch.nn.Module) -> list[torch.Tensor]:
    out = []
    for t in list(module.parameters()) + list(module.buffers()):
        both = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(both, t.detach().contiguous())
        out.append(torch.stack(both))
    return out


def _spectral_u(module: torch.nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for n, b in module.named_buffers() if n.endswith("_u")]


def _replicas_identical(rank: int, world: int, recipe: str, overrides: list[str], steps: int) -> None:
    task, engines, batches = _setup(recipe, overrides)
    n_critic = task.cfg.gan.n_critic
    u_before = _spectral_u(engines["d"].module)
    stepped = 0
    for _ in range(steps):
        out = task.train_step(engines, [next(batches) for _ in range(n_critic)])
        stepped += out.stepped
    # fp16 may skip the first steps while GradScaler finds its scale; fp32 and bf16 never skip.
    assert stepped == steps or (task.cfg.precision == "fp16" and stepped > 0), stepped
    for name in ("g", "d"):
        for both in _gather_state(engines[name].module):
            assert torch.equal(both[0], both[1]), name
    for both in _gather_state(task.ema):
        assert torch.equal(both[0], both[1]), "ema"
    if task.cfg.model.spectral_norm_d:  # the u vectors moved (and, gathered above, moved alike)
        u_after = _spectral_u(engines["d"].module)
        moved = [not torch.allclose(a, b) for a, b in zip(u_before, u_after) if a.numel() > 1]  # 1-d u is +-1
        assert moved and all(moved), moved


@pytest.mark.parametrize(
    "name,recipe,overrides",
    [
        (
            "mlp-hinge-sn-ncritic2",
            RING,
            [
                "gan.loss=hinge",
                "gan.penalty=none",
                "model.spectral_norm_d=true",
                "gan.n_critic=2",
                "data.global_batch_size=64",
            ],
        ),
        (
            "dcgan-syncbn-wgangp",
            DIGITS,
            [
                "gan.loss=wgan",
                "gan.penalty=wgan_gp",
                "model.sync_bn=true",
                "data.global_batch_size=32",
                "model.channels=8",
            ],
        ),
        ("lazy-r1", RING, ["gan.penalty=r1", "gan.penalty_every=2", "data.global_batch_size=64"]),
        # The penalty-only step unscales the critic's optimizer a second time: it needs an update between.
        (
            "lazy-r1-fp16",
            RING,
            ["precision=fp16", "gan.penalty=r1", "gan.penalty_every=2", "data.global_batch_size=64"],
        ),
    ],
    ids=lambda x: x if isinstance(x, str) and "/" not in x else None,
)
@pytest.mark.slow
def test_replicas_identical_after_steps(name, recipe, overrides):
    spawn(_replicas_identical, 2, recipe, overrides, 5)


def _lazy_r1_without_zero_term(rank: int, world: int) -> None:
    task, engines, batches = _setup(RING, ["gan.penalty=r1", "gan.penalty_every=1", "data.global_batch_size=64"])
    D = engines["d"]
    real = next(batches)[0].requires_grad_(True)
    out = D.model(real).float().flatten()
    pen = gan.grad_penalty_r1(gan.input_gradients(out, real, None))
    D.backward(pen, 1)  # penalty only: D's last bias gets no gradient, DDP never reduces it
    D.step()
    with pytest.raises(RuntimeError, match="finished reduction"):
        D.model(next(batches)[0])


def test_penalty_only_backward_without_zero_term_breaks_ddp():
    """Why the lazy R1 step adds 0 * D(x).sum(): without it DDP is left mid-reduction."""
    spawn(_lazy_r1_without_zero_term, 2)


@pytest.mark.slow
def test_two_ranks_match_one_rank(tmp_path):
    common = [
        "tracking.enabled=false",
        "train.max_steps=20",
        "data.global_batch_size=64",
        "train.eval_every_steps=0",
        "checkpoint.every_steps=0",
        "gan.penalty=r1",
        "model.spectral_norm_d=true",
    ]
    check(run_dtrain(["train", RING, *common, f"output_dir={tmp_path / 'one'}"], cwd=tmp_path))
    check(run_dtrain(["train", RING, *common, f"output_dir={tmp_path / 'two'}"], cwd=tmp_path, nproc=2))
    one, two = load_params(tmp_path / "one" / "model.pt"), load_params(tmp_path / "two" / "model.pt")
    assert max_param_diff(one, two, buffers=True) < 1e-5  # model.pt: G-EMA
    for name in ("g", "d"):  # the trained G and D themselves, from the final checkpoint
        a, b = (
            torch.load(tmp_path / run / "checkpoints" / "step_00000020" / name / "state.pt", weights_only=True)["model"]
            for run in ("one", "two")
        )
        assert max_param_diff(a, b, buffers=True) < 1e-5, name
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["world_size"] == 2 and {"modes", "high_quality", "kl_uniform"} <= set(s["eval"])
    assert (tmp_path / "two" / "samples.png").exists()


def test_penalties_match_hand_computation():
    # D(x) = a * sum(x^2)  =>  grad D = 2 a x
    a = 0.7
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0]], requires_grad=True)
    out = a * x.pow(2).sum(1)
    grads = gan.input_gradients(out, x, None)
    assert torch.allclose(grads, 2 * a * x.detach())
    norms = torch.tensor([2 * a * 5.0, 2 * a * 1.0])
    assert gan.grad_penalty_wgan_gp(grads).item() == pytest.approx(((norms - 1) ** 2).mean().item())
    assert gan.grad_penalty_r1(grads).item() == pytest.approx((norms**2).mean().item())
    # Under fp16 the AMP recipe differentiates the scaled output and unscales: same value.
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x2 = x.detach().clone().requires_grad_(True)
    scaled = gan.input_gradients(a * x2.pow(2).sum(1), x2, scaler)
    assert torch.allclose(scaled, grads)
    # And the penalty is differentiable (create_graph): d/da of R1 = 2 * mean(4 a |x|^2) / a... check autograd runs.
    a_t = torch.tensor(a, requires_grad=True)
    x3 = x.detach().clone().requires_grad_(True)
    pen = gan.grad_penalty_r1(gan.input_gradients(a_t * x3.pow(2).sum(1), x3, None))
    (da,) = torch.autograd.grad(pen, a_t)
    assert da.item() == pytest.approx(2 * pen.item() / a)


def test_ring_and_grid_geometry():
    modes, std = quality.mixture_modes("ring")
    assert len(torch.unique(modes.round(decimals=4), dim=0)) == 8 and std == 0.01  # no repeated mode
    assert torch.allclose(modes.norm(dim=1), torch.ones(8))
    grid, std = quality.mixture_modes("grid")
    assert grid.shape == (25, 2) and std == 0.05 and set(grid[:, 0].tolist()) == {-4.0, -2.0, 0.0, 2.0, 4.0}


def test_mode_metrics_on_real_and_collapsed_samples():
    g = torch.Generator().manual_seed(0)
    for kind, k in (("ring", 8), ("grid", 25)):
        real = quality.mode_metrics(quality.sample_mixture(kind, 2500, g), kind)
        # In 2-D, P(|x - mode| <= 3 std) = 1 - exp(-9/2) = 0.989 for real samples.
        assert real["modes"] == k and abs(real["high_quality"] - 0.989) < 0.01 and real["kl_uniform"] < 0.02
    modes, std = quality.mixture_modes("ring")
    collapsed = quality.mode_metrics(modes[3] + std * torch.randn(2500, 2, generator=g), "ring")
    assert collapsed["modes"] == 1 and collapsed["kl_uniform"] == pytest.approx(math.log(8))
    assert quality.mode_metrics(torch.zeros(100, 2), "ring")["high_quality"] == 0.0


def test_image_metrics_separate_real_from_degenerate():
    from dtrain.data.images import digits

    train, test = digits(0.2, normalize=False)
    clf = quality.digits_classifier(*train.tensors)
    real_train, held_out = train.tensors[0], test.tensors[0]
    real = quality.image_metrics(clf, real_train, held_out)
    assert real["frechet"] < 0.2 and real["precision"] > 0.8 and real["recall"] > 0.8 and real["density"] > 0.8
    # 360 held-out images cannot cover all 1,437 reference balls; with equal counts coverage is ~1.
    assert real["coverage"] > 0.5 and real["class_coverage"] == 1.0
    g = torch.Generator().manual_seed(0)
    noise = quality.image_metrics(clf, real_train, torch.rand(held_out.shape, generator=g) * 2 - 1)
    one = quality.image_metrics(clf, real_train, held_out[:1].expand(len(held_out), -1, -1, -1))
    assert noise["frechet"] > 20 * real["frechet"] and noise["precision"] < 0.2 and noise["coverage"] < 0.05
    assert one["recall"] < 0.05 and one["coverage"] < 0.05 and one["class_coverage"] == 0.1


def test_ema_generator_samples_with_standing_batchnorm_statistics():
    # G's running statistics, copied into the EMA every step, belong to other weights: before
    # sampling, the EMA's are re-estimated over batches of its own activations.
    cfg = load_config(DIGITS, ["tracking.enabled=false", "model.channels=8"])
    task = gan.GANTask(cfg)
    g = task.models()["g"].module
    with torch.no_grad():
        for p in task.ema.parameters():
            p.mul_(1.5)  # the average has drifted from G
    bn = next(m for m in task.ema.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    bn.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]) if m.training else None)
    task.samples({"g": SimpleNamespace(module=g)}, 10)
    assert len(seen) == cfg.gan.standing_stats_batches > 0
    assert torch.allclose(bn.running_mean, torch.cat(seen).mean((0, 2, 3)), atol=1e-5)
    assert not task.ema.training


def test_noise_streams_never_overlap():
    """G's noise (stream 2) at step k once equalled D's (stream 0) at step k + 15,838."""
    seeds = {gan.noise_seed(0, stream, step) for stream in range(3) for step in range(20_000)}
    assert len(seeds) == 3 * 20_000
    old = lambda seed, stream, step: seed * 1_000_003 + stream * 7_919 + step  # noqa: E731  the linear mix
    assert old(0, 2, 100) == old(0, 0, 100 + 15_838)  # what the test guards against
