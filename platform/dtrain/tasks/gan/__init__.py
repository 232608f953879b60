"""GANs across ranks: two models, two engines, one step that reads top to bottom.

Recipes: 2-D mixtures (8 Gaussians on a ring, 25 on a grid) with MLPs, and a DCGAN-style
pair on scikit-learn's 8x8 digits. Losses wgan | hinge | nonsaturating, n_critic, TTUR
(optim_g / optim_d, each with the platform's LR scaling and warmup), spectral norm on D
(optionally G), gradient penalty wgan_gp (interpolates) or r1 (reals), optionally lazy,
and an EMA of G used for evaluation and samples.

Distributed choices (tested in tests/test_gan.py):
- G and D are separate DDP/DeepSpeed engines. In the G step D runs *unwrapped* with
  requires_grad off, so no all-reduce is spent on D. In the D step G runs unwrapped under
  no_grad (its output is detached).
- D sees real, fake (and interpolates) in one concatenated forward: DDP wants one forward
  per backward.
- Noise (and WGAN-GP's mixing weights) are drawn for the *global* batch from a generator
  seeded by (seed, step), and each rank takes its slice: the run is world-size invariant
  and resumes exactly, like the supervised tasks.
- Spectral norm's u/v buffers are updated by power iteration from the weights alone, so
  ranks with equal weights keep equal u/v without any broadcast (broadcast_buffers off
  for D). G's BatchNorm statistics are synchronised (model.sync_bn) or broadcast.
- A lazy R1 step is a penalty-only backward; the R1 term does not reach D's last bias,
  so a zero-weighted term over D's output is added and DDP reduces every parameter.
- fp16: penalty gradients follow the AMP recipe (scaled autograd.grad, unscale, penalty
  under autocast); G and D share one precision object, whose GradScaler is updated once
  per iteration after G's step, and between a critic step and the next use of the critic's
  optimizer (GradScaler unscales an optimizer once per update).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from dtrain.data import images
from dtrain.protocols import BaseTask, Engine, LossTerms, ModelSpec, StepOutput
from dtrain.runtime import distributed
from dtrain.tasks.gan import quality
from dtrain.tasks.gan.config import GANConfig, GanDataConfig, GanModelConfig, GanSection
from dtrain.tasks.gan.losses import d_loss, g_loss, grad_penalty_r1, grad_penalty_wgan_gp, input_gradients
from dtrain.tasks.gan.networks import MLP, DCDiscriminator, DCGenerator

__all__ = [
    "GANConfig",
    "GanDataConfig",
    "GanModelConfig",
    "GanSection",
    "GANTask",
    "MLP",
    "DCGenerator",
    "DCDiscriminator",
    "d_loss",
    "g_loss",
    "grad_penalty_r1",
    "grad_penalty_wgan_gp",
    "input_gradients",
    "noise_seed",
]


def noise_seed(seed: int, stream: int, step: int) -> int:
    """A seed for (seed, stream, step) that no other triple shares in practice: NumPy's
    SeedSequence hashes the whole entropy tuple, so streams never overlap the way a linear
    mix (seed * a + stream * b + step) does once step reaches b."""
    return int(np.random.SeedSequence([seed, stream, step]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


class GANTask(BaseTask):
    config_class = GANConfig
    cfg: GANConfig
    data_shape: tuple[int, ...]
    ema: nn.Module | None

    def headline_metric(self) -> tuple[str, bool]:
        """Digits: the Fréchet distance to held-out digits; 2-D modes: the JS divergence of the
        modes' histogram from uniform (both lower is better)."""
        return ("frechet" if self.cfg.data.dataset == "digits" else "js_uniform"), False

    def datasets(self) -> tuple[TensorDataset, TensorDataset]:
        d = self.cfg.data
        if d.dataset == "digits":
            train, test = images.digits(d.val_fraction, normalize=False)
            self.data_shape = (1, 8, 8)
            self.classifier = quality.digits_classifier(*train.tensors)
            # Scored against held-out images: a generator that memorised the training set would
            # score perfectly against those. The train-set scores are reported too (train_*), so
            # memorisation shows as train scores well above the held-out ones.
            self.real_reference, self.train_reference = test.tensors[0], train.tensors[0]
            return TensorDataset(train.tensors[0]), test
        rng = torch.Generator().manual_seed(self.cfg.seed)
        points = quality.sample_mixture(d.dataset, d.num_samples, rng)
        self.data_shape = (2,)
        return TensorDataset(points), TensorDataset(quality.sample_mixture(d.dataset, 1000, rng))

    def models(self) -> dict[str, ModelSpec]:
        m, gan = self.cfg.model, self.cfg.gan
        gen: nn.Module
        disc: nn.Module
        if self.cfg.data.dataset == "digits":
            gen, disc = (
                DCGenerator(m.z_dim, m.channels, m.spectral_norm_g),
                DCDiscriminator(m.channels, m.spectral_norm_d),
            )
        else:
            gen = MLP(m.z_dim, 2, m.hidden_g, m.layers_g, nn.ReLU(), m.spectral_norm_g)
            disc = MLP(2, 1, m.hidden_d, m.layers_d, nn.LeakyReLU(0.2), m.spectral_norm_d)
        self.ema = copy.deepcopy(gen).eval().requires_grad_(False) if gan.ema_decay > 0 else None
        self.d_steps = self.g_steps = 0
        lazy = gan.penalty != "none" and gan.penalty_every > 1
        return {
            # G's BatchNorm buffers differ per rank unless synchronised: then DDP broadcasts them.
            "g": ModelSpec(gen, self.cfg.optim_g, 1, broadcast_buffers=not m.sync_bn),
            # D's only buffers are spectral norm's u/v: deterministic from equal weights.
            "d": ModelSpec(
                disc,
                self.cfg.optim_d,
                gan.n_critic * (1 + (1 / gan.penalty_every if lazy else 0)),
                broadcast_buffers=False,
            ),
        }

    def inference_model(self) -> nn.Module:
        """The generator (model.pt holds the one samples come from: the EMA when on, same shape)."""
        return self.models()["g"].module

    def predict(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """Samples for latent vectors (N, model.z_dim), or for `N` fresh ones: digits in [-1, 1]
        (N, 1, 8, 8), or 2-D points."""
        z = torch.randn(inputs, self.cfg.model.z_dim) if isinstance(inputs, int) else torch.as_tensor(inputs)
        out: torch.Tensor = model(z.float())
        return out

    def micro_batches_per_step(self, accum: int) -> int:
        return self.cfg.gan.n_critic  # each critic update takes a fresh batch of reals

    def _noise(
        self, stream: int, step: int, n_local: int, device: torch.device, *shape: int, uniform: bool = False
    ) -> torch.Tensor:
        """This rank's slice of a global-batch draw seeded by (seed, stream, step)."""
        world, rank = distributed.world_size(), distributed.rank()
        rng = torch.Generator().manual_seed(noise_seed(self.cfg.seed, stream, step))
        draw = torch.rand if uniform else torch.randn
        return draw(n_local * world, *shape, generator=rng)[rank::world].to(device)

    # ------------------------------------------------------------------ the step

    def train_step(
        self, engines: dict[str, Engine], micro_batches: list[Any], terms: LossTerms | None = None
    ) -> StepOutput:
        G, D = engines["g"], engines["d"]
        stats: dict[str, torch.Tensor] = {}

        # ---- critic: n_critic updates, each on a new batch of reals
        d_ok = True
        for i, (real,) in enumerate(micro_batches):
            norm_d, ok = self._critic_step(G, D, real, stats)
            d_ok &= ok
            last = i == len(micro_batches) - 1
            lazy_now = (
                self.cfg.gan.penalty != "none"
                and 1 < self.cfg.gan.penalty_every
                and self.d_steps % self.cfg.gan.penalty_every == 0
            )
            # GradScaler unscales an optimizer once per update(): the critic's next step (its
            # penalty step, or the next critic update) needs one in between. The iteration's
            # last update comes after G's step.
            if not last or lazy_now:
                D.precision.update()
            if lazy_now:
                d_ok &= self._lazy_penalty_step(D, real.detach(), G.precision.scaler, stats)
                if not last:
                    D.precision.update()

        # ---- generator: D frozen and unwrapped, so no gradient or all-reduce for D's weights
        D.module.requires_grad_(False)
        self.g_steps += 1
        real = micro_batches[-1][0]
        with G.precision.autocast():
            fake = G.model(self._noise(2, self.g_steps, len(real), real.device, self.cfg.model.z_dim))
            loss_g = g_loss(self.cfg.gan.loss, D.module(fake).float().flatten())
        G.backward(loss_g, 1)
        D.module.requires_grad_(True)
        norm_g, g_ok = G.step()
        G.precision.update()  # the iteration's last scaler update, shared by G and D
        self._update_ema(G.module)

        stats["g_loss"] = loss_g.detach()
        stats["grad_norm_g"] = norm_g.detach().to(stats["g_loss"].device)
        # train/loss is the critic's (the loop's loss); train/d_loss and train/g_loss name both.
        return StepOutput(loss=stats["d_loss"], grad_norm=norm_d, stepped=d_ok and g_ok, metrics=stats)

    def _critic_step(
        self, G: Engine, D: Engine, real: torch.Tensor, stats: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, bool]:
        """One critic update on reals and G's fakes (+ the penalty when not lazy)."""
        gan, n = self.cfg.gan, len(real)
        self.d_steps += 1
        with torch.no_grad(), G.precision.autocast():  # G not trained here
            fake = G.module(self._noise(0, self.d_steps, n, real.device, self.cfg.model.z_dim)).float()
        eager_penalty = gan.penalty != "none" and gan.penalty_every == 1
        parts = [real.requires_grad_(gan.penalty == "r1" and eager_penalty), fake]
        if gan.penalty == "wgan_gp" and eager_penalty:
            eps = self._noise(1, self.d_steps, n, real.device, *([1] * len(self.data_shape)), uniform=True)
            parts.append((eps * real.detach() + (1 - eps) * fake).requires_grad_(True))
        with D.precision.autocast():
            out = D.model(torch.cat(parts)).float().flatten()  # one forward: DDP wants one per backward
            loss = d_loss(gan.loss, out[:n], out[n : 2 * n])
        stats["d_loss"] = loss.detach()
        if eager_penalty:
            x, o = (parts[0], out[:n]) if gan.penalty == "r1" else (parts[2], out[2 * n :])
            with D.precision.autocast():
                grads = input_gradients(o, x, G.precision.scaler)
                pen = (
                    grad_penalty_r1(grads) * gan.penalty_weight / 2
                    if gan.penalty == "r1"
                    else grad_penalty_wgan_gp(grads) * gan.penalty_weight
                )
            loss = loss + pen
            stats["penalty"] = pen.detach()
        D.backward(loss, 1)
        return D.step()

    def _lazy_penalty_step(
        self, D: Engine, real: torch.Tensor, scaler: torch.amp.GradScaler, stats: dict[str, torch.Tensor]
    ) -> bool:
        """A penalty-only critic update (StyleGAN2's lazy R1), weighted by the interval."""
        gan = self.cfg.gan
        x = real.requires_grad_(True)
        with D.precision.autocast():
            out = D.model(x).float().flatten()
            pen = grad_penalty_r1(input_gradients(out, x, scaler)) * gan.penalty_weight / 2 * gan.penalty_every
            # R1 never reaches D's last bias; without this zero-weighted term that parameter gets
            # no gradient, and DDP (find_unused_parameters=False) would not reduce it in step.
            loss = pen + 0.0 * out.sum()
        D.backward(loss, 1)
        stats["penalty"] = pen.detach()
        return D.step()[1]

    @torch.no_grad()
    def _update_ema(self, g: nn.Module) -> None:
        if self.ema is None:
            return
        decay = self.cfg.gan.ema_decay
        self.ema.to(next(g.parameters()).device)  # created on the CPU, before the engines moved G
        for e, p in zip(self.ema.parameters(), g.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1 - decay)
        for eb, b in zip(self.ema.buffers(), g.buffers()):
            eb.copy_(b)

    def check_inputs(self, models: dict[str, nn.Module], batch: Any) -> dict[str, torch.Tensor]:
        """D on reals, G on noise."""
        (real,) = batch
        z = torch.randn(len(real), self.cfg.model.z_dim, generator=torch.Generator().manual_seed(0))
        return {"d": real, "g": z.to(real.device)}

    # ------------------------------------------------------------------ evaluation and outputs

    def sampler(self, engines: dict[str, Engine]) -> nn.Module:
        return self.ema if self.ema is not None else engines["g"].module

    @torch.no_grad()
    def _standing_stats(self, g: nn.Module, device: torch.device, batch: int = 256) -> None:
        norms = [m for m in g.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms or self.cfg.gan.standing_stats_batches <= 0:
            return
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        noise = torch.Generator().manual_seed(54321)  # the same on every rank: same statistics
        g.train()
        for _ in range(self.cfg.gan.standing_stats_batches):
            g(torch.randn(batch, self.cfg.model.z_dim, generator=noise).to(device))

    @torch.no_grad()
    def samples(self, engines: dict[str, Engine], n: int) -> torch.Tensor:
        g = self.sampler(engines)
        device = next(engines["g"].module.parameters()).device
        g.to(device)
        was = g.training
        if g is self.ema:
            self._standing_stats(g, device)
        g.eval()
        z = torch.randn(n, self.cfg.model.z_dim, generator=torch.Generator().manual_seed(12345)).to(device)
        out: torch.Tensor = g(z).float().cpu()
        g.train(was)
        return out

    def evaluate(self, engines: dict[str, Engine], loader: DataLoader[Any], device: torch.device) -> dict[str, float]:
        # Every rank holds the same G-EMA and uses the same noise: the same numbers, no collective.
        fake = self.samples(engines, self.cfg.gan.eval_samples)
        if self.cfg.data.dataset == "digits":
            held_out = quality.image_metrics(self.classifier, self.real_reference, fake)
            train = quality.image_metrics(self.classifier, self.train_reference, fake)
            return held_out | {f"train_{k}": v for k, v in train.items() if k != "class_coverage"}
        return quality.mode_metrics(fake, self.cfg.data.dataset)

    def final_state_dict(self, engines: dict[str, Engine]) -> dict[str, torch.Tensor]:
        """model.pt: the generator used for samples (the EMA when on), as a plain state_dict."""
        return {k: v.detach().cpu().clone() for k, v in self.sampler(engines).state_dict().items()}

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"d_steps": self.d_steps, "g_steps": self.g_steps}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.d_steps, self.g_steps = state["d_steps"], state["g_steps"]
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def write_artifacts(self, out_dir: Path, engines: dict[str, Engine]) -> list[Path]:
        """samples.png: a grid of digits, or the 2-D samples over the modes' 3-sigma circles."""
        fake, path = self.samples(engines, self.cfg.gan.eval_samples), out_dir / "samples.png"
        if self.cfg.data.dataset == "digits":
            quality.image_grid(fake, path)
        else:
            quality.scatter_plot(fake, self.cfg.data.dataset, path)
        return [path]
