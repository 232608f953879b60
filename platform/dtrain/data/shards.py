"""Samples streamed from tar shards (WebDataset's layout), split across ranks and DataLoader
workers, every sample once per epoch, with a resumable position.

A shard is a plain tar file; a sample is the run of consecutive members sharing a key (the
name up to its first dot: `000017.png`, `000017.cls`), which is how WebDataset writes them
(`write_shards` here does the same), so shards written by either read with either. Python's
`tarfile` reads them; no index is needed beyond each shard's sample count, taken from its
headers once.

Each epoch the shard order is shuffled from (seed, epoch); the epoch's samples, in that order,
are numbered p = 0, 1, ...; rank r of W takes p = r, r + W, r + 2W, ... (the union of the ranks'
step-t batches is a contiguous run of the stream, whatever W), and within a rank batch b goes
to worker b mod num_workers, which is the order a DataLoader returns worker batches in: the
same batches with or without workers. Resuming at this rank's k-th sample skips the first k
(headers only, no data read) and counts batches from there, as the new iterator does. Shuffle
samples across shards when writing them: streams do not shuffle within a shard.
"""

from __future__ import annotations

import copy
import io
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dtrain.data.seeding import sample_generator
from dtrain.errors import ConfigError

Sample = dict[str, bytes]
"""One sample as stored: extension -> bytes (`{"png": ..., "cls": b"3"}`)."""


def write_shards(
    samples: Iterable[Sample], folder: str | os.PathLike[str], per_shard: int, prefix: str = "shard"
) -> list[Path]:
    """Write `samples` into tar shards of `per_shard` samples: folder/shard-000000.tar, ..."""
    out, tar, n = Path(folder), None, 0
    files: list[Path] = []
    out.mkdir(parents=True, exist_ok=True)
    try:
        for i, sample in enumerate(samples):
            if n % per_shard == 0:
                if tar is not None:
                    tar.close()
                    _publish(tar)
                files.append(out / f"{prefix}-{len(files):06d}.tar")
                tar = tarfile.open(_partial(files[-1]), "w")
            n += 1
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                assert tar is not None
                tar.addfile(info, io.BytesIO(data))
        if tar is not None:
            tar.close()
            _publish(tar)
            tar = None
    finally:
        if tar is not None:  # an error: the shard being written is removed, never published
            tar.close()
            Path(str(tar.name)).unlink(missing_ok=True)
    return files


def _partial(path: Path) -> Path:
    """A shard is written under this name and renamed when complete: a reader never sees half one."""
    return path.with_name(path.name + ".partial")


def _publish(tar: tarfile.TarFile) -> None:
    partial = Path(str(tar.name))
    os.replace(partial, partial.with_name(partial.name.removesuffix(".partial")))


def _key(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(base)] + base.split(".", 1)[0]


def _samples(path: Path, wanted: Callable[[int], bool]) -> Iterator[tuple[int, Sample]]:
    """(index in shard, sample) for the samples `wanted(index)` accepts; the others' data is
    never read (tarfile seeks over it)."""
    with tarfile.open(path, "r:") as tar:
        index, key = -1, None
        sample: Sample = {}
        for member in tar:
            if not member.isfile():
                continue
            k = _key(member.name)
            if k != key:
                if key is not None and wanted(index):
                    yield index, sample
                index, key, sample = index + 1, k, {}
            if wanted(index):
                f = tar.extractfile(member)
                assert f is not None
                sample[member.name[len(k) + 1 :]] = f.read()
        if key is not None and wanted(index):
            yield index, sample


def _count_keys(path: Path) -> int:
    """Samples in a shard: runs of members sharing a key, as `_samples` groups them. A shard
    without its end-of-archive marker (two zero blocks after the last member) was cut short,
    at a sample boundary or inside one, where `tarfile` would silently stop early: refused."""
    try:
        with tarfile.open(path, "r:") as tar:
            keys = [_key(m.name) for m in tar if m.isfile()]
            end = tar.offset
        with open(path, "rb") as f:
            f.seek(end)
            marker = f.read(2 * tarfile.BLOCKSIZE)
    except (tarfile.TarError, OSError) as e:
        raise ConfigError("shard", str(path), f"is truncated or damaged ({e}); copy or write it again") from None
    samples = sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1])
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
        raise ConfigError(
            "shard",
            str(path),
            f"is truncated (no end-of-archive marker after {samples} samples, "
            f"{end} of {path.stat().st_size} bytes read); copy or write it again",
        )
    return samples


class TarShards(IterableDataset[Any]):
    """Training samples streamed from tar shards: `decode(sample) -> item` (bytes to tensors).
    The trainer calls `distribute` (rank, world, batch) and `set_position` (epoch, offset)."""

    def __init__(self, files: Sequence[str | os.PathLike[str]], decode: Callable[[Sample], Any]):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("TarShards: no shard files")
        self.decode = decode
        self.counts = [_count_keys(f) for f in self.files]
        self.total = sum(self.counts)
        self.rank, self.world, self.batch_size, self.seed = 0, 1, 1, 0
        self.epoch, self.start = 0, 0
        self.augment: Callable[[Any, torch.Generator], Any] | None = None

    def distribute(
        self,
        rank: int,
        world: int,
        batch_size: int,
        seed: int,
        augment: Callable[[Any, torch.Generator], Any] | None = None,
    ) -> TarShards:
        """A copy that yields rank `rank` of `world`'s share, batched by `batch_size` per worker."""
        out = copy.copy(self)
        out.rank, out.world, out.batch_size, out.seed, out.augment = rank, world, batch_size, seed, augment
        return out

    def set_position(self, epoch: int, start: int) -> None:
        """Iterate epoch `epoch` from this rank's `start`-th sample (a resumed epoch)."""
        self.epoch, self.start = epoch, start

    @property
    def min_rank_samples(self) -> int:
        """Samples the rank with the fewest gets per epoch: full steps must fit every rank."""
        return self.total // self.world

    def __len__(self) -> int:
        return len(range(self.rank, self.total, self.world))

    def order(self, epoch: int) -> list[int]:
        """The shards in epoch `epoch`'s order (the same on every rank and worker)."""
        perm = torch.randperm(len(self.files), generator=torch.Generator().manual_seed(self.seed + epoch))
        return perm.tolist()

    def __iter__(self) -> Iterator[Any]:

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)

        def mine(p: int) -> bool:
            if p % self.world != self.rank:
                return False
            j = p // self.world - self.start  # this rank's j-th sample of this iterator
            return j >= 0 and (j // self.batch_size) % workers == worker  # a new iterator starts at worker 0

        first = 0  # global position of the shard's first sample
        for s in self.order(self.epoch):
            n, base = self.counts[s], first
            first += n
            if not any(mine(p) for p in range(base, base + n)):
                continue  # nothing of this shard is ours: not even opened
            for i, sample in _samples(self.files[s], lambda i, base=base: mine(base + i)):  # type: ignore[misc]
                item = self.decode(sample)
                if self.augment is not None:
                    item = self.augment(item, sample_generator(self.seed, self.epoch, base + i))
                yield item
