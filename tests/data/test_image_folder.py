"""Image folders decoded lazily in DataLoader workers give the batches the in-memory loader gives."""

from __future__ import annotations

import pytest
import torch
from helpers import CNN, write_image_folder

from dtrain.data import BatchPlan, train_loader
from dtrain.data.images import ImageFiles
from dtrain.tasks.cnn import CNNTask
from dtrain.train.config import load_config


def _batches(folder, decode: str, workers: int, augment: bool, seed: int = 0, n: int = 3):
    cfg = load_config(
        CNN,
        [
            f"data.path={folder}",
            "model.image_size=16",
            f"data.decode={decode}",
            f"data.augment={str(augment).lower()}",
            f"seed={seed}",
        ],
    )
    task = CNNTask(cfg)
    train, test = task.datasets()
    assert isinstance(train, ImageFiles) == (decode == "lazy")
    plan = BatchPlan(global_batch=16, per_rank=8, accum=1, world_size=2)
    out = []
    for rank in range(2):
        loader = train_loader(train, plan, rank, cfg.seed, workers, False, task.augmentation())
        loader.sampler.set_epoch(1)  # type: ignore[attr-defined]
        out += [b for _, b in zip(range(n), loader)]
    return out, [test[i] for i in range(len(test))]


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
def test_lazy_folder_with_workers_gives_the_in_memory_batches(tmp_path, augment):
    folder = write_image_folder(tmp_path / "images")
    memory, memory_test = _batches(folder, "memory", 0, augment)
    lazy, lazy_test = _batches(folder, "lazy", 2, augment)
    for (xm, ym), (xl, yl) in zip(memory, lazy):
        assert torch.equal(ym, yl) and torch.allclose(xm, xl, atol=1e-5)
    assert all(
        torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], atol=1e-5) for a, b in zip(memory_test, lazy_test)
    )
    # What the comparison would catch: another shuffle (seed) is other batches.
    other, _ = _batches(folder, "lazy", 0, augment, seed=1)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(memory, other))


def test_lazy_decode_of_digits_is_one_line(tmp_path):
    from dtrain.config import ConfigError

    with pytest.raises(ConfigError, match="data.decode.*applies to image folders"):
        CNNTask(load_config(CNN, ["data.decode=lazy"])).datasets()
