"""Tables read through Hugging Face `datasets` (`dtrain.data.tables`, examples/hf_datasets) keep the
guarantees of dtrain's own loaders: every row once per epoch at any world size and with loader
workers, a 2-rank run resumed mid-epoch equal to the straight run, and per-row augmentation
that makes 1 rank and 2 ranks train alike."""

from __future__ import annotations

import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PY, check, env_for_cli, max_param_diff, run_dtrain, spawn, trained_once

from dtrain import data
from dtrain.checkpoint import safeload
from dtrain.config import ConfigError
from dtrain.data import tables

pytest.importorskip("datasets", reason='datasets is not installed (pip install -e ".[hf]")')

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_datasets"
RECIPE = str(EXAMPLE / "recipe.yaml")
BASE = ["train.max_steps=12", "train.eval_every_steps=0", "checkpoint.every_steps=0", "tracking.enabled=false"]
RUNS = {  # 1617 training rows / 64: an epoch is 25 steps, so step 5 is mid-epoch
    1: [("one-rank", ())],
    2: [
        ("straight", ()),
        ("resumed", ("train.stop_at_step=5",)),
        ("resumed", ("resume=auto",)),
        ("plain", ("data.augment=false",)),
        ("workers", ("data.num_workers=2",)),
    ],
}


def make_table(output: Path, *flags: str) -> None:
    """The example's own script, as a user runs it."""
    check(
        subprocess.run(
            [PY, str(EXAMPLE / "make_table.py"), "--output", str(output), *flags],
            capture_output=True,
            text=True,
            env=env_for_cli(),
            timeout=300,
        )
    )


def _train(rank: int, world: int, root: str) -> None:
    from dtrain.runtime.distributed import DistEnv
    from dtrain.train.config import load_config
    from dtrain.train.fit import fit

    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    sys.path.insert(0, str(EXAMPLE))
    for name, overrides in RUNS[world]:
        cfg = load_config(RECIPE, [*BASE, f"data.path={root}/digits.parquet", f"output_dir={root}/{name}", *overrides])
        fit(cfg, DistEnv(rank=rank, world_size=world, local_world_size=world), torch.device("cpu"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    def train(root: Path) -> None:
        make_table(root / "digits.parquet")
        spawn(_train, 1, str(root))
        spawn(_train, 2, str(root))

    return trained_once(tmp_path_factory, "hfdata", train)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return safeload.load_weights(run / "model.safetensors")


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory):
    """The digits as each kind of table make_table.py writes."""
    root = tmp_path_factory.mktemp("tables")
    for name in ("digits.parquet", "digits.jsonl", "digits.arrow"):
        make_table(root / name)
    make_table(root / "digits_hf", "--save-to-disk")
    return root


@pytest.mark.parametrize("name", ["digits.parquet", "digits.jsonl", "digits.arrow", "digits_hf"])
def test_every_kind_of_table_gives_the_same_rows_and_split(table_dir, name):
    train, held_out = tables.open_splits(str(table_dir / name), 0.1)
    assert (len(train), len(held_out)) == (1617, 180)
    assert train[5]["id"] == 5 and held_out[0]["id"] == 1617 and len(train[5]["pixels"]) == 64


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_row_once_per_epoch_at_any_world_size(table_dir, world, workers):
    train, _ = tables.open_splits(str(table_dir / "digits.parquet"), 0.1)
    rows = tables.Rows(train.select(range(60)), operator.itemgetter("id"))  # 60 rows: whole batches at 1, 2 and 3
    plan = data.BatchPlan(global_batch=5 * world, per_rank=5, accum=1, world_size=world)
    epochs = []
    for epoch in (0, 1):
        seen: list[int] = []
        for rank in range(world):
            loader = data.train_loader(rows, plan, rank, seed=0, num_workers=workers, pin_memory=False)
            loader.sampler.set_epoch(epoch)
            seen += [int(i) for batch in loader for i in batch]
        assert sorted(seen) == list(range(60))  # each row once, none lost to the shards
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # and each epoch in another order


@pytest.mark.slow
def test_a_two_rank_run_resumed_mid_epoch_equals_the_straight_run_and_one_rank(runs):
    straight = weights(runs / "straight")
    assert max_param_diff(weights(runs / "resumed"), straight) <= 1e-6
    assert max_param_diff(weights(runs / "one-rank"), straight) <= 1e-5  # augmentation belongs to rows, not ranks
    assert max_param_diff(weights(runs / "workers"), straight) <= 1e-6  # and not to loader workers
    # What the bounds tell apart: the same run without its augmentation ends elsewhere.
    assert max_param_diff(weights(runs / "plain"), straight) > 1e-3


def test_a_column_that_is_not_there_is_named_in_one_line(table_dir, tmp_path):
    proc = run_dtrain(
        [
            "train",
            RECIPE,
            *BASE,
            f"data.path={table_dir / 'digits.parquet'}",
            "data.label_column=label",
            f"output_dir={tmp_path}/out",
        ],
        cwd=EXAMPLE,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.label_column='label': is not a column of" in proc.stderr and "id, pixels, digit" in proc.stderr


def test_a_file_that_is_not_a_table_is_refused_naming_it(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ConfigError, match="data.path=.*broken.parquet.*cannot be read as a table"):
        tables.open_splits(str(bad), 0.1)
    with pytest.raises(ConfigError, match="no such file or folder"):
        tables.open_splits(str(tmp_path / "missing.parquet"), 0.1)
