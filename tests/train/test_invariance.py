"""World-size invariance, end to end through `dtrain train` and torchrun (real gloo ranks).

Same seed, same global batch: N ranks x B/N (with SyncBN) must follow the trajectory of
1 rank x B. Each equivalence is paired with a broken variant that must differ, so these
tests can fail. 8 steps: long enough for the broken variants to be 1e-4 and more away, short
enough that float rounding (which differs with the CPU's kernels, AVX2 or AVX-512) does not
grow chaotically past 1e-5 (30 steps of SGD on BatchNorm took 1e-6 to 8e-4 on one CPU).
"""

import pytest
from helpers import ROOT, check, load_params, max_param_diff, run_dtrain

RECIPE = str(ROOT / "recipes" / "cnn_digits.yaml")
COMMON = [
    "tracking.enabled=false",
    "train.max_steps=8",
    "data.augment=false",
    "checkpoint.every_steps=0",
    "train.eval_every_steps=0",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("invariance")

    def run(name: str, nproc: int, *overrides: str):
        if not (root / name / "model.pt").exists():
            check(
                run_dtrain(["train", RECIPE, *COMMON, f"output_dir={root / name}", *overrides], cwd=root, nproc=nproc)
            )
        return load_params(root / name / "model.pt")

    return run


def test_two_ranks_with_syncbn_match_one_rank(runs):
    one = runs("1x64", 0, "data.global_batch_size=64")
    two = runs("2x32-syncbn", 2, "data.global_batch_size=64", "model.sync_bn=true")
    assert max_param_diff(one, two) < 1e-5
    assert max_param_diff(one, two, buffers=True) < 1e-5  # running statistics too


def test_two_ranks_without_syncbn_differ(runs):
    one = runs("1x64", 0, "data.global_batch_size=64")
    two = runs("2x32-nosync", 2, "data.global_batch_size=64", "model.sync_bn=false")
    assert max_param_diff(one, two) > 1e-4


@pytest.mark.slow
def test_accumulation_equals_the_large_batch(runs):
    """BatchNorm-free model: 2 ranks x 2 micro-steps x 16 == 1 rank x 64."""
    mlp = ["task=helpers:MLPTask", "data.global_batch_size=64"]
    one = runs("mlp-1x64", 0, *mlp)
    acc = runs("mlp-2x2x16", 2, *mlp, "data.grad_accum_steps=2")
    assert max_param_diff(one, acc) < 1e-5


@pytest.mark.slow
def test_accumulation_with_batchnorm_matches_per_micro_batch_statistics(runs):
    """With BatchNorm, statistics are per micro-batch: 2 ranks x 2 x 16 (synced) equals 1 rank
    x 2 x 32, and visibly differs from 1 rank x 64."""
    acc = runs("cnn-2x2x16", 2, "data.global_batch_size=64", "data.grad_accum_steps=2", "model.sync_bn=true")
    ref = runs("cnn-1x2x32", 0, "data.global_batch_size=64", "data.grad_accum_steps=2")
    assert max_param_diff(acc, ref) < 1e-5
    assert max_param_diff(acc, runs("1x64", 0, "data.global_batch_size=64")) > 1e-4
