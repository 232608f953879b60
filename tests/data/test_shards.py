"""Tar shards streamed by TarShards: every sample exactly once per epoch at world size 1, 2 and 3
with 0 and 2 DataLoader workers, the same batches with or without workers, a resumable
position, and an exact mid-epoch resume of a 2-rank training run."""

from __future__ import annotations

import pytest
import torch
from helpers import CNN, check, load_params, max_param_diff, run_dtrain
from streamed import decode, encode
from torch.utils.data import DataLoader

from dtrain.data.images import digits
from dtrain.data.shards import TarShards, write_shards

N = 23


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    x = torch.arange(N, dtype=torch.float32).view(N, 1)
    return write_shards((encode(x[i], i) for i in range(N)), folder, per_shard=8)  # 8 + 8 + 7


def _epoch(files, world: int, rank: int, workers: int, epoch: int = 1, start: int = 0, batch: int = 2):
    stream = TarShards(files, decode).distribute(rank, world, batch, seed=5)
    stream.set_position(epoch, start)
    loader = DataLoader(stream, batch_size=batch, num_workers=workers)
    return [int(y) for _, ys in loader for y in ys]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_once_per_epoch_across_ranks_and_workers(shards, world):
    for workers in (0, 2):
        seen = [label for rank in range(world) for label in _epoch(shards, world, rank, workers)]
        assert sorted(seen) == list(range(N)), (world, workers)
    # Workers change who reads, not what a rank gets, nor in which order.
    assert [_epoch(shards, world, r, 0) for r in range(world)] == [_epoch(shards, world, r, 2) for r in range(world)]


def test_epochs_reshuffle_and_a_position_resumes(shards):
    assert len({tuple(_epoch(shards, 1, 0, 0, epoch=e)) for e in range(4)}) > 1  # shard order per epoch
    full = _epoch(shards, 2, 1, 0)
    assert _epoch(shards, 2, 1, 2, start=3) == full[3:]


@pytest.mark.slow
def test_streamed_training_resumes_exactly_mid_epoch(tmp_path):
    train, _ = digits(0.2)
    folder = tmp_path / "shards"
    write_shards((encode(x, y) for x, y in zip(*train.tensors)), folder, per_shard=200)
    common = [
        "task=streamed:StreamedDigitsTask",
        f"data.path={folder}",
        "data.global_batch_size=32",
        "train.max_steps=12",
        "tracking.enabled=false",
        "train.eval_every_steps=0",
        "model.sync_bn=false",
    ]
    check(
        run_dtrain(
            ["train", CNN, *common, "checkpoint.every_steps=0", f"output_dir={tmp_path / 'straight'}"],
            cwd=tmp_path,
            nproc=2,
        )
    )
    resumed = [*common, "data.num_workers=2", "checkpoint.every_steps=5", f"output_dir={tmp_path / 'resumed'}"]
    check(run_dtrain(["train", CNN, *resumed, "train.stop_at_step=5"], cwd=tmp_path, nproc=2))
    proc = check(run_dtrain(["train", CNN, *resumed, "resume=auto"], cwd=tmp_path, nproc=2))
    assert "resumed at step 5" in proc.stdout  # 44 steps per epoch: mid-epoch
    a, b = load_params(tmp_path / "straight" / "model.pt"), load_params(tmp_path / "resumed" / "model.pt")
    assert max_param_diff(a, b) < 1e-6
    step10 = torch.load(
        tmp_path / "resumed" / "checkpoints" / "step_00000010" / "model" / "state.pt", weights_only=True
    )["model"]
    assert max_param_diff(b, step10) > 1e-4  # what the bound would catch: two steps fewer


@pytest.mark.parametrize("cut", ["at_a_sample_boundary", "inside_a_sample"])
def test_a_truncated_shard_is_refused_in_one_line_naming_it(tmp_path, cut):
    """tarfile stops silently where a copy was cut short: at a sample boundary it yielded half
    the shard (41 steps instead of 44), inside a sample a KeyError. Now the missing
    end-of-archive marker is found when the shards are opened."""
    import tarfile

    from dtrain.config import ConfigError

    files = write_shards(({"x": bytes([i]) * 700, "cls": b"1"} for i in range(10)), tmp_path, per_shard=5)
    assert sorted(f.name for f in tmp_path.iterdir()) == [f.name for f in files]  # no .partial left
    with tarfile.open(files[1]) as tar:
        boundary = tar.getmembers()[4].offset  # the third sample's first member
    data = files[1].read_bytes()
    files[1].write_bytes(data[: boundary if cut == "at_a_sample_boundary" else boundary + 900])
    with pytest.raises(ConfigError, match=rf"^shard='{files[1]}': is truncated"):
        TarShards(files, decode)
    assert len(TarShards(files[:1], decode)) == 5  # the intact one reads
