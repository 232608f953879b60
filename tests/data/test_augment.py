"""Per-sample augmentation randomness: every random number a sample's augmentation draws
comes from (seed, epoch, index), so the shipped CNN recipe (augmentation on) trains to the
same weights on 1 rank x 64 as on 2 ranks x 32, with or without DataLoader workers, through a
mid-epoch resume."""

from __future__ import annotations

import pytest
import torch
from helpers import CNN, check, load_params, max_param_diff, run_dtrain
from torch.utils.data import DataLoader, TensorDataset

from dtrain.data import Augmented, ResumableDistributedSampler
from dtrain.tasks.cnn import random_shift

N = 24


def _dataset() -> TensorDataset:
    return TensorDataset(torch.arange(N * 16, dtype=torch.float32).view(N, 1, 4, 4), torch.arange(N))


def global_rng_shift(sample, generator):
    """The mistake the per-sample stream prevents: drawing from the process's own RNG."""
    x, y = sample
    return random_shift((x, y), torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))


def _seen(augment, world: int, workers: int, epochs: int = 2, start_at: int = 0) -> dict[tuple[int, int], torch.Tensor]:
    """Every (epoch, label) -> augmented image, over all ranks of `world`, loaded with `workers`."""
    torch.manual_seed(1234)  # the same process RNG state everywhere: only the world and workers differ
    seen = {}
    for rank in range(world):
        sampler = ResumableDistributedSampler(Augmented(_dataset(), augment, seed=7), world, rank, seed=7, keyed=True)
        loader = DataLoader(
            sampler.dataset,
            batch_size=2,
            sampler=sampler,
            num_workers=workers,
            generator=torch.Generator().manual_seed(rank),
        )
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            sampler.start_index = start_at if epoch == epochs - 1 else 0
            for x, y in loader:
                seen.update({(epoch, int(label)): img for img, label in zip(x, y)})
    return seen


def test_per_sample_streams_do_not_depend_on_world_size_workers_or_resume():
    one = _seen(random_shift, world=1, workers=0)
    assert len(one) == 2 * N
    assert any(not torch.equal(one[0, i], one[1, i]) for i in range(N))  # a new draw each epoch
    for world, workers in ((2, 0), (3, 2)):
        assert {k: v.tolist() for k, v in _seen(random_shift, world, workers).items()} == {
            k: v.tolist() for k, v in one.items()
        }
    # resumed 4 samples into the last epoch: the rest of the epoch is augmented as before
    resumed = _seen(random_shift, world=2, workers=2, start_at=4)
    assert all(torch.equal(img, one[key]) for key, img in resumed.items())
    # The failure guarded against: the process's RNG gives each world size other images.
    a, b = _seen(global_rng_shift, 1, 0), _seen(global_rng_shift, 2, 0)
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_shipped_cnn_recipe_with_augmentation_is_world_size_invariant_and_resumes(tmp_path):
    common = [
        "train.max_steps=30",
        "tracking.enabled=false",
        "train.eval_every_steps=0",
        "checkpoint.every_steps=0",
    ]  # the recipe as shipped otherwise: data.augment=true
    check(run_dtrain(["train", CNN, *common, f"output_dir={tmp_path / 'one'}"], cwd=tmp_path))
    two = [*common, f"output_dir={tmp_path / 'two'}", "data.num_workers=2"]
    check(run_dtrain(["train", CNN, *two, "train.stop_at_step=13"], cwd=tmp_path, nproc=2))
    check(run_dtrain(["train", CNN, *two, "resume=auto"], cwd=tmp_path, nproc=2))
    one, resumed = load_params(tmp_path / "one" / "model.pt"), load_params(tmp_path / "two" / "model.pt")
    assert max_param_diff(one, resumed, buffers=True) < 1e-5  # 1.2e-1 when each rank drew its own shifts
