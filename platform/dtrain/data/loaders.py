"""The data-sharded loaders: training (DistributedSampler, resumable mid-epoch) and exact eval.

Training: torch's DistributedSampler gives rank r the positions r, r+W, r+2W, ... of one
seeded permutation, so the union of the ranks' step-t batches is the single process's
step-t batch: the world size changes who computes, not what is computed.

Augmentation: a task's per-sample augmentation draws from `sample_generator(seed, epoch,
index)`, a stream that belongs to the sample, not to the rank or worker that happens to load
it: the sampler hands the loader (epoch, index) keys and `Augmented` opens the sample's stream
in `__getitem__` (in the main process or a worker alike). So a recipe with augmentation on is
world-size invariant and resumes exactly mid-epoch with any `data.num_workers`.

Evaluation: DistributedSampler pads the last round with repeated samples, which biases
accuracy when len(dataset) % world_size != 0. `ExactShardSampler` splits the indices
(shards may differ by one) and pads the shorter shards with one repeated index, so that
every rank runs the same number of forwards of the same batch sizes (under ZeRO-3 or FSDP a
forward is a collective); `evaluate` leaves the padding out of the sums, which are then
all-reduced: every sample counted exactly once.

Workers (`data.num_workers`) start from a forkserver, not by forking the rank: a fork copies
whatever lock another thread holds at that instant, and CPython 3.11's child re-initialising
its thread states can block forever on one (seen: a rank's evaluation workers hung in
`os.fork` while its training loader's queue threads ran). The server is a fresh process that
imports torch once, so a worker still starts in milliseconds; the dataset travels to it by
pickle, which is why a task's dataset must be picklable when workers are on.
"""

from __future__ import annotations

import multiprocessing
import pickle  # nosec B403 # only its PicklingError, to name the key: nothing is unpickled here
from dataclasses import dataclass
from typing import Any, Iterator, Sized, cast

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from dtrain.config import Config
from dtrain.data.seeding import Augment as Augment  # re-exported: tasks type their augmentation with it
from dtrain.data.seeding import sample_generator as sample_generator
from dtrain.data.seeding import seeded as seeded
from dtrain.data.shards import TarShards
from dtrain.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    per_rank: int
    accum: int
    world_size: int


def plan_batches(cfg: Config, world_size: int) -> BatchPlan:
    """per-rank batch = global / (world x accumulation), or a ConfigError if it does not divide."""
    g, a = cfg.data.global_batch_size, cfg.data.grad_accum_steps
    if g % (world_size * a):
        unit = world_size * a
        below, above = g // unit * unit, (g // unit + 1) * unit  # the nearest valid sizes
        ok = " or ".join(str(b) for b in (below, above) if b > 0)
        raise ConfigError(
            "data.global_batch_size",
            g,
            f"must be divisible by world size x data.grad_accum_steps = {world_size} x {a} (the nearest: {ok})",
        )
    return BatchPlan(g, g // (world_size * a), a, world_size)


class Augmented(Dataset[Any]):
    """`dataset` whose item (epoch, index) is `augment(dataset[index], sample_generator(...))`."""

    def __init__(self, dataset: Dataset[Any], augment: Augment, seed: int):
        self.dataset, self.augment, self.seed = dataset, augment, seed

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        return self.augment(self.dataset[index], sample_generator(self.seed, epoch, index))


class ResumableDistributedSampler(DistributedSampler[Any]):
    """DistributedSampler that can start part-way into an epoch (exact mid-epoch resume);
    `keyed`: it yields (epoch, index) for `Augmented` instead of the bare index."""

    def __init__(self, dataset: Dataset[Any], num_replicas: int, rank: int, seed: int, keyed: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start_index = 0
        self.keyed = keyed

    def __iter__(self) -> Iterator[Any]:
        indices = list(super().__iter__())[self.start_index :]
        return iter([(self.epoch, i) for i in indices] if self.keyed else indices)

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class ExactShardSampler(Sampler[int]):
    """Rank r of W gets indices r, r+W, ... (`num_real` of them), then repeats of its first
    index up to ceil(n / W): every rank the same length, every sample once among the real ones."""

    def __init__(self, n: int, num_replicas: int, rank: int):
        real = list(range(rank, n, num_replicas))
        self.num_real = len(real)
        length = -(-n // num_replicas)
        self.indices = real + [real[0] if real else 0] * (length - len(real))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(
    ds: Dataset[Any],
    plan: BatchPlan,
    rank: int,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    augment: Augment | None = None,
) -> DataLoader[Any]:
    if isinstance(ds, TarShards):
        # A stream splits itself (rank, worker). Workers are not persistent: each epoch's
        # iterators must see the position set in this process (a persistent worker keeps the
        # copy of the dataset it started with).
        stream = ds.distribute(rank, plan.world_size, plan.per_rank, seed, augment)
        return DataLoader(
            stream,
            batch_size=plan.per_rank,
            drop_last=True,
            num_workers=num_workers,
            pin_memory=pin_memory,
            multiprocessing_context=_workers(num_workers),
        )
    if augment is not None:
        ds = Augmented(ds, augment, seed)
    sampler = ResumableDistributedSampler(ds, plan.world_size, rank, seed, keyed=augment is not None)
    # drop_last: every rank runs the same number of equal micro-batches, so no rank waits
    # in an all-reduce the others never enter, and batch statistics stay world-size invariant.
    # The loader's own generator (for worker seeds) keeps iter(loader) from drawing on the
    # global RNG, whose state the checkpoint restores mid-epoch for exact resume.
    return DataLoader(
        ds,
        batch_size=plan.per_rank,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        multiprocessing_context=_workers(num_workers),
        generator=torch.Generator().manual_seed(seed + rank),
    )


def set_position(loader: DataLoader[Any], epoch: int, start: int) -> None:
    """The next `iter(loader)` runs epoch `epoch` from this rank's `start`-th sample."""
    if isinstance(loader.dataset, TarShards):
        loader.dataset.set_position(epoch, start)
        return
    sampler = loader.sampler
    assert isinstance(sampler, ResumableDistributedSampler)
    sampler.set_epoch(epoch)
    sampler.start_index = start


def eval_loader(ds: Dataset[Any], batch_size: int, world_size: int, rank: int, num_workers: int) -> DataLoader[Any]:
    # Persistent: the evaluation set and its shard never change, so its workers start once.
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=ExactShardSampler(len(cast(Sized, ds)), world_size, rank),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        multiprocessing_context=_workers(num_workers),
    )


def start(loader: DataLoader[Any]) -> Iterator[Any]:
    """`iter(loader)`, where workers start: a dataset that cannot travel to them is a
    config error naming the key, not a pickling traceback."""
    try:
        return iter(loader)
    except (AttributeError, TypeError, pickle.PicklingError) as e:
        if loader.num_workers == 0 or "pickle" not in str(e):
            raise
        raise ConfigError(
            "data.num_workers",
            loader.num_workers,
            f"the dataset cannot be sent to worker processes ({e}); make it picklable "
            "(module-level classes and functions, no lambdas or open handles) or use 0",
        ) from None


def close(loader: DataLoader[Any]) -> None:
    """Stop the persistent workers of a loader now (a run that ends mid-epoch would otherwise
    leave them to a garbage collection, which waits for each to stop, 5 s a loader)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def _workers(num_workers: int) -> Any:
    """Where worker processes start from (see the module's docstring): None without workers."""
    if num_workers == 0:
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "dtrain.data"])  # imported once, in the server
    return ctx


def steps_per_epoch(loader: DataLoader[Any], accum: int) -> int:
    """Optimizer steps in one full epoch (the sampler's own length, not a resumed remainder;
    for a stream, what the rank with the fewest samples can fill)."""
    if isinstance(loader.dataset, TarShards):
        assert loader.batch_size
        return (loader.dataset.min_rank_samples // loader.batch_size) // accum
    sampler = loader.sampler
    assert isinstance(sampler, ResumableDistributedSampler) and loader.batch_size
    return (sampler.num_samples // loader.batch_size) // accum


def batch_len(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    items = batch.values() if isinstance(batch, dict) else batch
    return next(batch_len(v) for v in items if isinstance(v, (torch.Tensor, list, tuple, dict)))


def head(batch: Any, n: int) -> Any:
    """The first `n` samples of a batch (a tensor, or a tuple/list/dict of them)."""
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: head(v, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(head(v, n) for v in batch)
    return batch


def move(batch: Any, device: torch.device) -> Any:
    """Tensors (or a tuple/list/dict of them) to `device`, asynchronously when pinned."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move(v, device) for v in batch)
    return batch
