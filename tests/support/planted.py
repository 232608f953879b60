"""User tasks with one planted bug each, the kind `dtrain check` exists to catch (test-only:
nothing here reaches a production run). Named in recipes as `planted:ClassName`."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from dtrain.config import Config
from dtrain.tasks import Task
from dtrain.tasks.cnn import CNNTask
from dtrain.tasks.transformer import Attention, CharTransformer, TransformerTask


class Constant(nn.Module):
    """Logits that ignore the input: a learned constant per class."""

    def __init__(self, classes: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


class IgnoresInput(CNNTask):
    def build_model(self) -> nn.Module:
        return Constant(self.num_classes)


class Mixer(nn.Module):
    """An MLP whose hidden activations go through `view` where a transpose was meant: the
    (batch, hidden) matrix is reinterpreted as (hidden, batch), mixing samples."""

    def __init__(self, classes: int):
        super().__init__()
        self.inp, self.out = nn.Linear(64, 32), nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x.flatten(1)))
        h = h.view(h.size(1), h.size(0)).t()  # the bug: h.view(...) is not a transpose of h
        return self.out(h)


class MixesBatch(CNNTask):
    def build_model(self) -> nn.Module:
        return Mixer(self.num_classes)


class LargeBias(CNNTask):
    """The classifier's last bias initialised large: confident wrong guesses at step 0."""

    def build_model(self) -> nn.Module:
        model = super().build_model()
        with torch.no_grad():
            model.fc.bias.copy_(torch.randn(self.num_classes) * 10)
        return model


class PeekingAttention(Attention):
    """Causal attention whose mask lets every position see one position ahead."""

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril(diagonal=1)  # the bug: tril(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class LeakyCausal(TransformerTask):
    def build_model(self) -> CharTransformer:
        model = super().build_model()
        for block in model.blocks:
            block.attn = PeekingAttention(self.cfg.model)
        return model


class LastPositionOnly(TransformerTask):
    """nanoGPT's `forward(idx)` without targets: the logits of the last position only. Not a
    bug, but the causal check has nothing to look at: a SKIP that says why, not a crash."""

    def build_model(self) -> nn.Module:
        return _LastPosition(super().build_model())


class _LastPosition(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.inner(idx)[:, -1:]


class DuplicatedSplit(CNNTask):
    """40 training images copied into the test split (11 % of it)."""

    def datasets(self) -> tuple[TensorDataset, TensorDataset]:
        train, test = super().datasets()
        x, y = train.tensors
        tx, ty = test.tensors
        return train, TensorDataset(torch.cat([tx[:-40], x[:40]]), torch.cat([ty[:-40], y[:40]]))


class PerRankInit(CNNTask):
    """Initial weights seeded by rank (a user's own seeding): the ranks build different models."""

    def build_model(self) -> nn.Module:
        import torch.distributed as dist

        torch.manual_seed(dist.get_rank() if dist.is_initialized() else 0)
        return super().build_model()


class DeadReLU(CNNTask):
    """An MLP whose first layer's bias is initialised at -100: every ReLU after it is dead,
    and the weights before it get no gradient."""

    def build_model(self) -> nn.Module:
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, self.num_classes))
        with torch.no_grad():
            model[1].bias.fill_(-100.0)
        return model


class PlantedCurve(CNNTask):
    """Evaluation reports a planted `score` curve, one value per evaluation (early stopping's test)."""

    CURVE = [0.1, 0.5, 0.45, 0.48, 0.9, 0.95]

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        if sums["count"] < 360:  # the metric-name probe at start (one batch), not an evaluation
            return {**super().eval_metrics(sums), "score": 0.0}
        self.evals = getattr(self, "evals", 0) + 1
        return {**super().eval_metrics(sums), "score": self.CURVE[min(self.evals, len(self.CURVE)) - 1]}


class PlantedHeadline(PlantedCurve):
    """The planted `score` as the task's headline metric (`checkpoint.keep_best`'s test)."""

    def headline_metric(self) -> tuple[str, bool]:
        return "score", True


class PixelTokens(CNNTask):
    """The digits CNN counting each image's 64 pixels as its tokens (the tokens/s hook's test)."""

    def tokens_per_sample(self) -> int:
        return 64


# ------------------------------------------------------------------ world-size invariance
# Each task below has exactly one reason why 2 ranks x 32 do not train like 1 rank x 64
# (`dtrain check --only invariance`'s tests); all are small MLPs on the digits.


def mlp(classes: int, *middle: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), *middle, nn.ReLU(), nn.Linear(32, classes))


class PlainBatchNorm(CNNTask):
    """BatchNorm that normalises with each rank's part of the batch (run with model.sync_bn=false)."""

    def build_model(self) -> nn.Module:
        return mlp(self.num_classes, nn.BatchNorm1d(32))


class GlobalDropout(CNNTask):
    """Dropout: its masks come from the global RNG, which dtrain seeds per rank."""

    def build_model(self) -> nn.Module:
        return mlp(self.num_classes, nn.Dropout(0.3))


def noise_from_the_global_rng(sample, generator):
    """Augmentation that ignores the sample's generator and draws from torch's global RNG."""
    x, y = sample
    return x + 0.1 * torch.randn_like(x), y


class GlobalAugmentation(CNNTask):
    def build_model(self) -> nn.Module:
        return mlp(self.num_classes)

    def augmentation(self):
        return noise_from_the_global_rng


class OwnOrder(torch.utils.data.Dataset):
    """A dataset that reads in its own order: item i is the next sample, whatever i is."""

    def __init__(self, inner):
        self.inner, self.next = inner, 0

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        self.next = (self.next + 1) % len(self.inner)
        return self.inner[self.next - 1]


class IgnoresSamplerIndex(CNNTask):
    """Every rank reads the same samples: the training set ignores the index the sampler gives."""

    def datasets(self):
        train, test = super().datasets()
        return OwnOrder(train), test

    def build_model(self) -> nn.Module:
        return mlp(self.num_classes)


class Counted(nn.Module):
    """A step counter kept as a buffer, counted on rank 0 only."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            self.calls += 1
        return x


class RankZeroBuffer(CNNTask):
    def build_model(self) -> nn.Module:
        return mlp(self.num_classes, Counted())


class ScatterSum(nn.Module):
    """Each pixel added 16 times (scaled 1..2) into its own bin with index_put_(accumulate=True),
    in an order drawn afresh on every call from a private generator seeded by the clock: per
    image, so no sample depends on another, but the bins' rounding changes from run to run, as
    atomic adds on a GPU do. (A private generator: the global RNG, which the check watches, is
    left alone.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        n = len(x)
        scale = torch.linspace(1, 2, 16, device=x.device)[:, None, None]
        values = (x.flatten(1)[None] * scale).flatten() * 1e3
        bins = torch.arange(n * 64, device=x.device).repeat(16)
        order = torch.randperm(len(bins), generator=torch.Generator().manual_seed(time.perf_counter_ns()))
        return (
            torch.zeros(n * 64, device=x.device).index_put_((bins[order],), values[order], accumulate=True).view(n, 64)
        )


class NondeterministicScatter(CNNTask):
    def build_model(self) -> nn.Module:
        return nn.Sequential(ScatterSum(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, self.num_classes))


class PaddedTokens(Task):
    """Sequences of random length padded with ignore_index: the loss is the mean over each rank's
    valid tokens, and the mean of those means is not the mean over the global batch's tokens."""

    config_class = Config

    def headline_metric(self):
        return "loss", False

    def datasets(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 16, (512, 12), generator=g)
        y = torch.roll(x, -1, dims=1)
        lengths = torch.randint(2, 13, (512, 1), generator=g)
        y = torch.where(torch.arange(12) < lengths, y, torch.full_like(y, -100))
        return TensorDataset(x[:448], y[:448]), TensorDataset(x[448:], y[448:])

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Embedding(16, 16), nn.Linear(16, 16))

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)

    def eval_sums(self, model, batch):
        x, y = batch
        return {
            "loss_sum": F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"),
            "count": (y != -100).sum(),
        }

    def eval_metrics(self, sums):
        return {"loss": sums["loss_sum"] / sums["count"]}


class RoundedPerRank(CNNTask):
    """The inputs computed another way on each rank: equal to rounding (a float32 mean over
    another thread count or batch does this), as the invariance check must tell from other data."""

    def datasets(self):
        import torch.distributed as dist

        train, test = super().datasets()
        rank = dist.get_rank() if dist.is_initialized() else 0
        x, y = train.tensors
        return TensorDataset(x * (1 + 1e-7 * rank), y), test

    def build_model(self) -> nn.Module:
        return mlp(self.num_classes)
