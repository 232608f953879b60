"""The GAN recipe's keys: data, networks, the `gan` section and two optimizers (TTUR)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dtrain.config import Config, DataConfig, ModelConfig, OptimConfig, validate_optim
from dtrain.errors import ConfigError


@dataclass
class GanDataConfig(DataConfig):
    dataset: Literal["ring", "grid", "digits"] = "ring"
    """ring: 8 Gaussians on a circle; grid: 25 on a 5x5 grid; digits: scikit-learn's 8x8 digits."""
    num_samples: int = 100_000
    """2-D points generated from the seed (one epoch)."""
    global_batch_size: int = 256


@dataclass
class GanModelConfig(ModelConfig):
    z_dim: int = 16
    """Dimension of the generator's Gaussian noise input."""
    hidden_g: int = 256
    """Hidden width of the MLP generator (2-D mixtures)."""
    hidden_d: int = 256
    """Hidden width of the MLP critic (2-D mixtures)."""
    layers_g: int = 3
    """Hidden layers of the MLP generator."""
    layers_d: int = 3
    """Hidden layers of the MLP critic."""
    channels: int = 64
    """DCGAN base width (digits)."""
    spectral_norm_d: bool = True
    """Spectral normalisation of every critic layer (Miyato et al. 2018)."""
    spectral_norm_g: bool = False
    """Spectral normalisation of the generator's layers too (SAGAN, BigGAN)."""


@dataclass
class GanSection:
    loss: Literal["wgan", "hinge", "nonsaturating"] = "hinge"
    """The adversarial loss: Wasserstein, hinge (SNGAN/BigGAN) or the non-saturating GAN loss."""
    n_critic: int = 1
    """Critic updates per generator update."""
    penalty: Literal["none", "wgan_gp", "r1"] = "none"
    """Critic gradient penalty: on interpolates (WGAN-GP) or on reals (R1, Mescheder et al. 2018)."""
    penalty_weight: float = 10.0
    """lambda of wgan_gp, gamma of r1."""
    penalty_every: int = 1
    """Lazy regularisation: a separate penalty-only critic step every k critic steps, weighted
    by k (StyleGAN2). 1: the penalty is part of every critic loss."""
    ema_decay: float = 0.999
    """EMA of G's weights, used for evaluation and samples. 0: evaluate G itself."""
    standing_stats_batches: int = 16
    """Before sampling, the EMA G's BatchNorm statistics are re-estimated over this many
    batches of its own activations ("standing statistics", BigGAN): G's running statistics,
    gathered with other weights, do not fit the averaged ones. 0: copy G's."""
    eval_samples: int = 2500
    """Generated samples scored at each evaluation (modes, quality, divergences)."""


def _adam(lr: float) -> OptimConfig:
    return OptimConfig(name="adam", lr=lr, betas=(0.0, 0.9), scale_rule="sqrt", schedule="constant", warmup_steps=0)


@dataclass
class GANConfig(Config):
    task: str = "gan"
    data: GanDataConfig = field(default_factory=GanDataConfig)
    model: GanModelConfig = field(default_factory=GanModelConfig)
    gan: GanSection = field(default_factory=GanSection)
    optim_g: OptimConfig = field(default_factory=lambda: _adam(1e-4))
    """The generator's optimizer (TTUR: G slower than D by default)."""
    optim_d: OptimConfig = field(default_factory=lambda: _adam(4e-4))
    """The critic's optimizer."""

    def validate(self) -> None:
        super().validate()
        if self.optim != OptimConfig():
            raise ConfigError("optim", "...", "a GAN recipe sets optim_g and optim_d (two optimizers), not optim")
        validate_optim(self.optim_g, "optim_g")
        validate_optim(self.optim_d, "optim_d")
        if self.data.grad_accum_steps != 1:
            raise ConfigError("data.grad_accum_steps", self.data.grad_accum_steps, "must be 1 for a GAN")
        for key in ("n_critic", "penalty_every", "eval_samples"):
            if getattr(self.gan, key) < 1:
                raise ConfigError(f"gan.{key}", getattr(self.gan, key), "must be >= 1")
        if not 0 <= self.gan.ema_decay < 1:
            raise ConfigError("gan.ema_decay", self.gan.ema_decay, "must be in [0, 1)")
        if self.gan.standing_stats_batches < 0:
            raise ConfigError("gan.standing_stats_batches", self.gan.standing_stats_batches, "must be >= 0")
        if self.model.init != "default":
            raise ConfigError(
                "model.init",
                self.model.init,
                "the GAN initialises its networks itself (DCGAN's "
                "N(0, 0.02), spectral norm's own parametrisation); use default",
            )
        ema = getattr(self, "ema", None)  # (the feature's section, composed in beside the task's)
        if ema is not None and ema.decay:
            raise ConfigError("ema.decay", ema.decay, "not for a GAN: it averages its generator itself (gan.ema_decay)")
        if self.compile and self.gan.penalty != "none":
            raise ConfigError(
                "compile",
                True,
                f"not with gan.penalty={self.gan.penalty}: the penalty's double backward "
                "(create_graph=True) is not supported by torch.compile; use gan.penalty=none or compile=false",
            )
