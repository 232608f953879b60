"""Offline GAN evaluation: nothing is downloaded.

2-D mixtures (VEEGAN / PacGAN protocol): a sample is *high quality* when it lies within
3 standard deviations of its nearest mode; a mode is *covered* when at least one high
quality sample is nearest to it. Also the KL and JS divergence of the histogram of high
quality samples over the modes from the uniform one.

Images: features from a small classifier trained once on the real training split (cached)
give a Frechet distance (the FID formula), precision / recall (Kynkaanniemi et al. 2019,
k=3), density / coverage (Naeem et al. 2020, k=5) and the share of classes produced.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dtrain.runtime.files import atomic_write

# --------------------------------------------------------------------------- 2-D mixtures


def mixture_modes(kind: str) -> tuple[torch.Tensor, float]:
    """(modes, std) of the PacGAN 2-D benchmarks: 8 modes on the unit circle at angles 2*pi*k/8
    with std 0.01 (not linspace(0, 2*pi, 8), which repeats a mode), or a 5x5 grid with
    spacing 2 and std 0.05."""
    if kind == "ring":
        angles = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
        return torch.stack([angles.cos(), angles.sin()], 1).float(), 0.01
    if kind == "grid":
        coords = torch.arange(-4, 5, 2, dtype=torch.float32)
        return torch.cartesian_prod(coords, coords), 0.05
    raise ValueError(f"unknown mixture {kind!r}")


def sample_mixture(kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
    modes, std = mixture_modes(kind)
    idx = torch.randint(len(modes), (n,), generator=generator)
    return modes[idx] + std * torch.randn(n, 2, generator=generator)


def mode_metrics(samples: torch.Tensor, kind: str) -> dict[str, float]:
    modes, std = mixture_modes(kind)
    d = torch.cdist(samples.float().cpu(), modes)
    dist, nearest = d.min(1)
    hq = dist <= 3 * std
    counts = torch.bincount(nearest[hq], minlength=len(modes)).double()
    k = len(modes)
    out = {"modes": float((counts > 0).sum()), "modes_total": float(k), "high_quality": float(hq.float().mean())}
    if counts.sum() > 0:
        p = counts / counts.sum()
        u = torch.full_like(p, 1 / k)
        nz = p > 0
        out["kl_uniform"] = float((p[nz] * (p[nz] / u[nz]).log()).sum())
        m = 0.5 * (p + u)
        js = 0.5 * (p[nz] * (p[nz] / m[nz]).log()).sum() + 0.5 * (u * (u / m).log()).sum()
        out["js_uniform"] = float(js)
    else:
        out["kl_uniform"], out["js_uniform"] = float("inf"), math.log(2)
    return out


def scatter_plot(samples: torch.Tensor, kind: str, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    modes, std = mixture_modes(kind)
    fig, ax = plt.subplots(figsize=(5, 5))
    s = samples.float().cpu().numpy()
    ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.4, label="G-EMA samples")
    for m in modes.numpy():
        ax.add_patch(matplotlib.patches.Circle(m, 3 * std, fill=False, color="red", lw=0.8))
    ax.set_aspect("equal")
    lim = float(modes.abs().max()) + 1.0
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), title=title or f"{kind}: samples and 3-sigma circles")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- image features


class DigitsClassifier(nn.Module):
    """The feature extractor: a small CNN on 8x8 digits in [-1, 1]; features are the 32-d
    penultimate activations, divided by their standard deviation over the real training
    images (`scale`), so distances do not depend on how this network happened to scale them."""

    scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(64 * 16, 32),
            nn.ReLU(),
        )
        self.head = nn.Linear(32, 10)
        self.register_buffer("scale", torch.ones(()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f: torch.Tensor = self.body(x)
        return f / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.body(x))
        return logits


def cache_dir() -> Path:
    return Path(os.environ.get("DTRAIN_CACHE", Path.home() / ".cache" / "dtrain"))


def digits_classifier(train_x: torch.Tensor, train_y: torch.Tensor) -> DigitsClassifier:
    """Train once (seeded, ~2 s on a CPU) and cache by the training split's fingerprint."""
    key = f"v2-{int(train_x.abs().sum().item() * 1000) % 10**9}-{len(train_x)}"
    path = cache_dir() / f"digits_classifier-{key}.pt"
    model = DigitsClassifier()
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        except Exception:  # nosec B110 # a damaged cache entry: train again
            pass
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(30):
        for idx in torch.randperm(len(train_x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(train_x[idx]), train_y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        model.scale.copy_(model.body(train_x).std())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))  # ranks write the same bytes
    return model.eval()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eps = np.eye(len(s1)) * 1e-6  # ReLU features can leave a covariance singular: regularise, as FID code does
    covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _kth_nn_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019: share of fakes inside the real k-NN manifold, and vice versa."""
    r_real, r_fake = _kth_nn_radius(real, k), _kth_nn_radius(fake, k)
    precision = (torch.cdist(fake, real) <= r_real[None, :]).any(1).float().mean()
    recall = (torch.cdist(real, fake) <= r_fake[None, :]).any(1).float().mean()
    return float(precision), float(recall)


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> tuple[float, float]:
    """Naeem et al. 2020: how many real k-NN balls hold each fake (density), and the share of
    real balls holding at least one fake (coverage)."""
    r_real = _kth_nn_radius(real, k)
    inside = torch.cdist(real, fake) <= r_real[:, None]  # (N real, M fake)
    density = inside.sum().float() / (k * fake.shape[0])
    coverage = inside.any(1).float().mean()
    return float(density), float(coverage)


@torch.no_grad()
def image_metrics(classifier: DigitsClassifier, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    fr, ff = classifier.features(real.float()), classifier.features(fake.float().clamp(-1, 1))
    precision, recall = precision_recall(fr, ff)
    density, coverage = density_coverage(fr, ff)
    classes = classifier.head(ff).argmax(1)
    return {
        "frechet": frechet_distance(fr.double().numpy(), ff.double().numpy()),
        "precision": precision,
        "recall": recall,
        "density": density,
        "coverage": coverage,
        "class_coverage": float(torch.unique(classes).numel() / 10),
    }


def image_grid(images: torch.Tensor, path: Path, nrow: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = images[: nrow * nrow].float().cpu().clamp(-1, 1).add(1).div(2)
    n, _, h, w = imgs.shape
    rows = math.ceil(n / nrow)
    canvas = torch.ones(rows * (h + 1), nrow * (w + 1))
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = imgs[i, 0]
    plt.imsave(path, canvas.numpy(), cmap="gray", vmin=0, vmax=1)
