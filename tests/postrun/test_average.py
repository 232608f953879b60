"""`dtrain average`: the uniform mean of a run's checkpoints, BatchNorm statistics recomputed,
from DDP and from FSDP2 (sharded, DCP) checkpoints alike."""

import pytest
import torch
from helpers import CNN, TINY_CNN, check, load_params, run_dtrain

from dtrain.postrun.average import uniform_average


def state(folder):
    return torch.load(folder / "model" / "state.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("avg")
    out = root / "out"
    check(
        run_dtrain(
            [
                "train",
                CNN,
                *TINY_CNN,
                "train.max_steps=15",
                "checkpoint.every_steps=5",
                "checkpoint.keep=3",
                f"output_dir={out}",
            ],
            cwd=root,
        )
    )
    return root, out / "checkpoints"


def test_the_average_is_the_mean_of_the_checkpoints(run):
    root, ckpts = run
    folders = [ckpts / f"step_{s:08d}" for s in (5, 10, 15)]
    proc = check(
        run_dtrain(["average", *map(str, folders), "--output", str(root / "avg.pt"), "--bn-batches", "0"], cwd=root)
    )
    assert "average: 3 checkpoint(s)" in proc.stdout and "accuracy" in proc.stdout
    avg, inputs = load_params(root / "avg.pt"), [state(f) for f in folders]
    for key, value in avg.items():
        if value.is_floating_point():
            mean = sum(s[key].double() for s in inputs) / 3
            assert (value.double() - mean).abs().max().item() < 1e-6, key
    # The check can fail: the last checkpoint alone is not the average.
    assert max((avg[k] - inputs[-1][k]).abs().max().item() for k in avg if avg[k].is_floating_point()) > 1e-3


def test_batchnorm_statistics_are_recomputed_for_the_averaged_weights(run):
    root, ckpts = run
    folders = [str(ckpts / f"step_{s:08d}") for s in (10, 15)]
    check(run_dtrain(["average", *folders, "--output", str(root / "bn.pt"), "--bn-batches", "4"], cwd=root))
    plain = uniform_average([state(ckpts / "step_00000010"), state(ckpts / "step_00000015")])
    bn = load_params(root / "bn.pt")
    weights = [k for k in bn if "running" not in k and bn[k].is_floating_point()]
    assert all(torch.equal(bn[k], plain[k]) for k in weights)  # the weights are the plain mean
    assert (bn["stem.1.running_mean"] - plain["stem.1.running_mean"]).abs().max().item() > 1e-4


def test_checkpoints_of_two_runs_are_refused_in_one_line(run, tmp_path):
    root, ckpts = run
    other = tmp_path / "elsewhere" / "checkpoints" / "step_00000005"
    other.mkdir(parents=True)
    proc = run_dtrain(
        ["average", str(ckpts / "step_00000005"), str(other), "--output", str(tmp_path / "x.pt")], cwd=tmp_path
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith("must be checkpoints of one run (step_* folders under the same output_dir/checkpoints)")
    )
    assert not (tmp_path / "x.pt").exists()
