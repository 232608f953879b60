"""Randomness that belongs to samples, not to ranks or loader workers.

A sample's augmentation (or noise) draws from `sample_generator(seed, epoch, index)`: the
same stream whichever rank or worker loads the sample, after any resume. This is what keeps a
recipe with augmentation world-size invariant and exactly resumable (see `dtrain.data`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import numpy as np
import torch

Augment = Callable[[Any, torch.Generator], Any]
"""A task's per-sample augmentation: (sample, the sample's generator) -> augmented sample.
Picklable (a module-level function or a functools.partial of one): workers receive it."""


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random stream of sample `index` in `epoch`: the same on any rank, in any worker,
    after any resume. SeedSequence mixes the three numbers (nearby keys, unrelated streams)."""
    (state,) = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state))


@contextlib.contextmanager
def seeded(generator: torch.Generator) -> Iterator[None]:
    """Run library transforms that draw from torch's global RNG (torchvision's) on the sample's
    own stream: the global RNG is seeded from `generator` inside, and restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (), generator=generator)))
        yield
