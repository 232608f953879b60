"""Exact resume on 2 ranks: 40 steps straight == 20 steps, stop, resume to 40; one MLflow run."""

import json
import shutil

import mlflow
import pytest
import torch
from helpers import ROOT, check, load_params, max_param_diff, mlflow_store, run_dtrain

from dtrain import checkpoint

RECIPE = str(ROOT / "recipes" / "cnn_digits.yaml")
# Mid-epoch stop (22 steps per epoch at batch 64), augmentation and SyncBN on: the sampler
# position and every rank's RNG stream must come back exactly.
COMMON = ["train.max_steps=40", "tracking.log_every=10", "train.eval_every_steps=0", "checkpoint.keep=3"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    uri = mlflow_store(root)

    def run(name: str, *overrides: str, expect_ok: bool = True):
        proc = run_dtrain(
            [
                "train",
                RECIPE,
                *COMMON,
                f"output_dir={root / name}",
                f"tracking.uri={uri}",
                f"tracking.experiment={name}",
                *overrides,
            ],
            cwd=root,
            nproc=2,
        )
        return check(proc) if expect_ok else proc

    run("straight")
    run("resumed", "train.stop_at_step=20")
    return root, uri, run


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(store):
    root, uri, run = store
    assert checkpoint.latest(root / "resumed" / "checkpoints").name == "step_00000020"
    assert not (root / "resumed" / "model.pt").exists()  # stopped, not finished
    proc = run("resumed", "resume=auto")
    assert "resumed at step 20" in proc.stdout
    a, b = load_params(root / "straight" / "model.pt"), load_params(root / "resumed" / "model.pt")
    assert max_param_diff(a, b, buffers=True) < 1e-6
    sa = json.loads((root / "straight" / "summary.json").read_text())
    sb = json.loads((root / "resumed" / "summary.json").read_text())
    assert sa["run_id"] != sb["run_id"] and sb["samples_seen"] == sa["samples_seen"] == 40 * 64
    assert sb["initial_loss"] == sa["initial_loss"] and abs(sb["final_loss"] - sa["final_loss"]) < 1e-6

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == sb["run_id"]  # the same run continued
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["dtrain.resumed"] == "true"
    history = client.get_metric_history(sb["run_id"], "train/loss")
    straight = client.get_metric_history(sa["run_id"], "train/loss")
    assert [m.step for m in history] == [10, 20, 30, 40]  # one continuous history, no gap, no repeat
    assert [m.value for m in history] == pytest.approx([m.value for m in straight], abs=1e-6)


@pytest.mark.slow
def test_replaying_data_on_resume_would_be_caught(store):
    """Break the mid-epoch position (resume from the epoch's start) and the test's check fails."""
    root, uri, run = store
    src = root / "resumed" / "checkpoints" / "step_00000020"
    broken = root / "broken" / "checkpoints" / "step_00000020"
    shutil.copytree(src, broken)
    state = torch.load(src / "trainer.pt", weights_only=True)
    state["trainer"]["batch_in_epoch"] = 0  # "forget" the 20 batches already seen
    torch.save(state, broken / "trainer.pt")
    run("broken", f"resume={broken}")
    a, b = load_params(root / "straight" / "model.pt"), load_params(root / "broken" / "model.pt")
    assert max_param_diff(a, b) > 1e-4


def test_corrupt_checkpoint_is_one_clear_line(tmp_path):
    bad = tmp_path / "checkpoints" / "step_00000005"
    (bad / "model").mkdir(parents=True)
    (bad / "trainer.pt").write_bytes(b"not a checkpoint")
    proc = run_dtrain(
        ["train", RECIPE, "tracking.enabled=false", f"resume={bad}", f"output_dir={tmp_path / 'out'}"], cwd=tmp_path
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"dtrain: error: resume: cannot load {bad / 'trainer.pt'}"), proc.stderr


def test_keep_last_checkpoints_and_atomic_layout(tmp_path):
    check(
        run_dtrain(
            [
                "train",
                RECIPE,
                "tracking.enabled=false",
                "train.max_steps=12",
                "checkpoint.every_steps=3",
                "checkpoint.keep=2",
                "data.global_batch_size=32",
                f"output_dir={tmp_path / 'out'}",
            ],
            cwd=tmp_path,
        )
    )
    root = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000009", "step_00000012"]
    assert (root / "latest").read_text().strip() == "step_00000012"
    # A crash mid-write leaves a .tmp folder, which is never taken as the latest checkpoint.
    (root / ".tmp-step_00000015").mkdir()
    (root / "latest").unlink()
    assert checkpoint.latest(root).name == "step_00000012"
    sd = torch.load(root / "step_00000012" / "model" / "state.pt", weights_only=True)
    client = torch.load(root / "step_00000012" / "trainer.pt", weights_only=True)
    assert set(sd) == {"model", "optimizer", "scheduler", "scaler"}
    assert client["trainer"]["step"] == 12 and len(client["rng"]) == 1
    assert set(client["rng"][0]) >= {"python", "numpy", "torch"}


@pytest.mark.slow
def test_an_optimizer_override_on_resume_is_refused_in_one_line(store, tmp_path):
    """`optim.lr` lives in the optimizer's and schedule's checkpointed state: it used to print
    the new peak LR and train on the checkpoint's (identical losses). Refused before training."""
    root, uri, run = store
    proc = run_dtrain(
        [
            "train",
            RECIPE,
            *COMMON,
            "tracking.enabled=false",
            f"resume={root / 'straight' / 'checkpoints'}",
            "optim.lr=0.02",
            f"output_dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("dtrain: error: resume: optim.lr=0.02: the checkpoint was trained with optim.lr=0.2"), line


@pytest.mark.slow
def test_resuming_into_a_new_output_dir_is_a_new_run_linked_to_the_old(store):
    """It reopened the old run (duplicate points at the resumed steps, the old params)."""
    root, uri, run = store
    straight = json.loads((root / "straight" / "summary.json").read_text())["run_id"]
    client = mlflow.MlflowClient(uri)
    before = [m.step for m in client.get_metric_history(straight, "train/loss")]
    run(
        "continued", f"resume={root / 'straight' / 'checkpoints'}", "train.max_steps=44", "tracking.experiment=straight"
    )
    runs = client.search_runs([client.get_experiment_by_name("straight").experiment_id])
    assert len(runs) == 2
    new = next(r for r in runs if r.info.run_id != straight)
    assert new.data.tags["dtrain.resumed_from_run"] == straight and new.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(new.info.run_id, "train/loss")] == [44]
    assert [m.step for m in client.get_metric_history(straight, "train/loss")] == before


@pytest.mark.slow
def test_resuming_on_fewer_ranks_with_more_accumulation_continues_the_same_run(tmp_path):
    """2 ranks x 32 for 10 steps (mid-epoch), then 1 rank x 2 micro-batches x 32 to step 20 ==
    2 ranks straight to step 20 (a BatchNorm-free model: every step averages the same 64
    samples). The checkpoint's data position is converted to the new micro-batches: a resume
    that kept it as written (planted: the checkpoint says it was already at accumulation 2)
    replays part of the epoch and parts visibly."""
    mlp = [
        "task=helpers:MLPTask",
        "train.max_steps=20",
        "train.eval_every_steps=0",
        "tracking.enabled=false",
        "checkpoint.every_steps=0",
    ]

    def run(name: str, *overrides: str, nproc: int = 2):
        return check(
            run_dtrain(["train", RECIPE, *mlp, f"output_dir={tmp_path / name}", *overrides], cwd=tmp_path, nproc=nproc)
        )

    run("straight")
    run("moved", "train.stop_at_step=10")
    shutil.copytree(tmp_path / "moved", tmp_path / "kept")
    proc = run("moved", "resume=auto", "data.grad_accum_steps=2", nproc=0)
    assert "resumed at step 10" in proc.stdout
    s = json.loads((tmp_path / "moved" / "summary.json").read_text())
    assert (s["world_size"], s["grad_accum_steps"], s["samples_seen"]) == (1, 2, 20 * 64)
    straight = load_params(tmp_path / "straight" / "model.pt")
    assert max_param_diff(straight, load_params(tmp_path / "moved" / "model.pt")) < 1e-5

    ckpt = tmp_path / "kept" / "checkpoints" / "step_00000010" / "trainer.pt"
    state = torch.load(ckpt, weights_only=True)
    state["trainer"]["grad_accum"] = 2  # its position read as 2-micro-batch steps: 5 steps, not 10
    torch.save(state, ckpt)
    run("kept", "resume=auto", "data.grad_accum_steps=2", nproc=0)
    assert max_param_diff(straight, load_params(tmp_path / "kept" / "model.pt")) > 1e-4


@pytest.mark.slow
def test_an_attempt_torchrun_counts_as_the_first_continues_its_job(tmp_path):
    """A job whose rank 1 is SIGKILLed after step 4's checkpoint, with no restart left, started
    again under the same rendezvous id: torchrun's attempt count is 0 again, as when an agent
    restarts its ranks because a host joined or returned, or a controller restarts the pod. It
    continues the job from step 4, in the same MLflow run. Broken on purpose: under another id it
    is another job, refused in one line, the checkpoints untouched."""
    uri, out = mlflow_store(tmp_path), tmp_path / "out"
    args = ["train", RECIPE, "task=faulty:FaultyTask", "model.hidden=32", "data.augment=false",
            "model.fault=kill:1:6", "train.max_steps=8", "checkpoint.every_steps=4", "tracking.log_every=1",
            f"tracking.uri={uri}", "tracking.experiment=again", f"output_dir={out}"]  # fmt: skip
    assert run_dtrain(args, tmp_path, nproc=2, job="job-a").returncode != 0
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    other = run_dtrain(args, tmp_path, nproc=2, job="job-b")
    assert other.returncode != 0 and "holds checkpoints of an earlier run" in other.stderr, other.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept
    again = check(run_dtrain(args, tmp_path, nproc=2, job="job-a"))
    assert "resumed at step 4" in again.stdout + again.stderr
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("again").experiment_id])
    assert run.info.status == "FINISHED" and json.loads((out / "summary.json").read_text())["steps"] == 8


def test_a_default_folder_holding_an_earlier_run_gives_way_to_the_next_and_resume_finds_the_newest(
    tmp_path, monkeypatch
):
    """`dtrain train recipe.yaml` twice (the README's first day: 1 process, then 2 ranks): the
    second run goes to runs/<recipe>-2 instead of meeting the first one's checkpoints;
    `resume=auto` continues the newest folder with checkpoints; a folder the user names stays."""
    from dtrain.train.config import load_config
    from dtrain.train.resume import default_folder

    monkeypatch.chdir(tmp_path)
    fresh, auto = load_config(RECIPE), load_config(RECIPE, ["resume=auto"])
    assert fresh.output_dir == "runs/cnn_digits" and default_folder(fresh) == "runs/cnn_digits"
    (tmp_path / "runs" / "cnn_digits" / "checkpoints" / "step_00000010").mkdir(parents=True)
    assert default_folder(fresh) == "runs/cnn_digits-2" and default_folder(auto) == "runs/cnn_digits"
    (tmp_path / "runs" / "cnn_digits-2").mkdir()
    (tmp_path / "runs" / "cnn_digits-2" / "summary.json").write_text("{}")  # finished, no checkpoints
    assert default_folder(fresh) == "runs/cnn_digits-3" and default_folder(auto) == "runs/cnn_digits"
    (tmp_path / "runs" / "cnn_digits-10" / "checkpoints" / "step_00000004").mkdir(parents=True)
    assert default_folder(auto) == "runs/cnn_digits-10"  # by number, not by name
    assert default_folder(load_config(RECIPE, ["checkpoint.overwrite=true"])) == "runs/cnn_digits"
