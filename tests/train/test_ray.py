"""dtrain as a Ray Train job (`dtrain train RECIPE --ray-workers N`) on a local Ray instance of
this machine's 2 CPUs: the workers train on the process group Ray makes, to torchrun's
parameters, and a worker SIGKILLed mid-run is restarted by Ray and resumes exactly, in the
same MLflow run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlflow
import pytest
import torch
from helpers import (
    CNN,
    DDP_BASELINE,
    PY,
    ROOT,
    TINY_CNN,
    check,
    env_for_cli,
    load_params,
    max_param_diff,
    mlflow_store,
    run_dtrain,
)

from dtrain.runtime.environments import read_env

pytest.importorskip("ray.train.torch", reason='Ray Train is not installed (pip install -e ".[ray]")')

RAY = ["--ray-workers", "2"]
# Ray's own services (GCS, raylet, dashboard agent) are heavy beside 2 training workers on 2 cores.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def test_a_ray_worker_environment_is_read_as_ray():
    env = read_env(
        {
            "RAY_JOB_ID": "01000000",
            "RANK": "1",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "NODE_RANK": "0",
            "MASTER_ADDR": "10.0.0.2",
            "MASTER_PORT": "4000",
        }
    )
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.num_nodes) == ("ray", 1, 4, 1, 2)
    assert read_env({"RANK": "1", "WORLD_SIZE": "4"}).launcher == "env"  # Ray's marker missing: not Ray


def test_bad_ray_options_are_refused_before_ray_starts(tmp_path):
    proc = run_dtrain(["train", CNN, "--ray-workers", "2", "--ray-max-failures", "-1"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--ray-max-failures=-1" in proc.stderr
    proc = run_dtrain(["train", CNN, "--ray-workers", "3", "data.global_batch_size=64"], cwd=tmp_path)
    assert proc.returncode == 2 and "data.global_batch_size=64" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "earlier" / "checkpoints" / "step_00000010").mkdir(parents=True)  # another run's
    proc = run_dtrain(["train", CNN, f"output_dir={tmp_path / 'earlier'}", *RAY], cwd=tmp_path)
    assert proc.returncode == 2 and "holds checkpoints of an earlier run (newest step_00000010)" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr  # refused before Ray started anything
    for address, words in (("nonsense", "Invalid address format"), ("127.0.0.1:1", "nothing answers there")):
        proc = run_dtrain(["train", CNN, *RAY, "--ray-address", address, f"output_dir={tmp_path}/o"], cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(f"dtrain: error: --ray-address='{address}': "), (
            proc.stderr
        )
        assert words in proc.stderr
    # No output_dir on the command line: the recipe's folder holds a run, so this one takes the
    # next free folder, said before Ray is asked for anything (here a head that is not there).
    (tmp_path / "runs" / "cnn_digits" / "checkpoints" / "step_00000010").mkdir(parents=True)
    proc = run_dtrain(["train", CNN, *RAY, "--ray-address", "127.0.0.1:1"], cwd=tmp_path)
    assert "runs/cnn_digits holds an earlier run; this one writes to runs/cnn_digits-2" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_ray_workers_train_the_cnn_as_torchrun_ranks_do_and_a_killed_worker_resumes_exactly(tmp_path, tiny_runs):
    """One Ray job of 2 workers, through examples/ray's script: rank 1 dies by SIGKILL before
    step 13; Ray restarts the group, which resumes at step 10's checkpoint, finishes the 20 steps
    in the same MLflow run and ends at the parameters of 2 torchrun ranks trained straight."""
    reference = tiny_runs("cnn-ddp", *DDP_BASELINE, recipe=CNN, base=TINY_CNN)
    out, uri = tmp_path / "ray", mlflow_store(tmp_path)
    tmp = tempfile.mkdtemp(prefix="r")  # short: Ray's sockets live below it
    proc = subprocess.run(
        [
            PY,
            str(ROOT / "examples" / "ray" / "train_on_ray.py"),
            CNN,
            "--workers",  # options before the overrides, as the script's docstring shows them
            "2",
            "--max-failures",
            "1",
            *TINY_CNN,
            *DDP_BASELINE,
            "task=faulty:KillOnceCNN",
            "checkpoint.every_steps=5",
            f"output_dir={out}",
            "tracking.enabled=true",
            f"tracking.uri={uri}",
            "tracking.experiment=ray",
            "tracking.log_every=4",
        ],
        cwd=tmp_path,
        env=env_for_cli(DTRAIN_TEST_KILL="1:13", HOME=str(tmp_path), TMPDIR=tmp, **RAY_ENV),
        capture_output=True,
        text=True,
        timeout=600,
    )
    check(proc)
    assert (out / ".killed-rank1").exists()  # the fault happened: rank 1 died before step 13
    assert "resumed at step 10" in proc.stdout + proc.stderr  # the new group continued from the newest checkpoint
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 20 and summary["samples_seen"] == 20 * 64
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ray").experiment_id])
    assert run.info.run_id == summary["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["dtrain.launcher"] == "ray" and run.data.tags["dtrain.resumed"] == "true"
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}) == [4, 8, 12, 16, 20]
    ray_params = load_params(out / "model.pt")
    assert max_param_diff(ray_params, load_params(reference / "model.pt"), buffers=True) <= 1e-6
    # What the bound tells apart: 20 steps moved the weights far beyond it from where they began.
    assert max_param_diff(ray_params, _initial_cnn()) > 1e-2
    assert not list(out.glob(".ray-*"))  # the job's marker is gone once it finished
    # The local instance was the job's own: Ray's token authentication, a token in no file, its
    # session folder inside a private one.
    (private,) = Path(tmp).glob("dtrain-ray-*")
    assert oct(private.stat().st_mode & 0o777) == "0o700" and os.listdir(private) == ["ray"]
    shutil.rmtree(tmp)
    assert not (tmp_path / ".ray").exists()


@pytest.mark.slow
def test_a_ray_job_out_of_restarts_ends_in_one_line_naming_the_dead_worker(tmp_path):
    out, uri = tmp_path / "ray", mlflow_store(tmp_path)
    proc = run_dtrain(
        [
            "train",
            CNN,
            *TINY_CNN,
            "task=faulty:KillOnceCNN",
            f"output_dir={out}",
            "tracking.enabled=true",
            f"tracking.uri={uri}",
            "tracking.experiment=ray",
            *RAY,
        ],
        cwd=tmp_path,
        DTRAIN_TEST_KILL="1:2",
        **RAY_ENV,
    )
    assert proc.returncode == 1
    assert "ray: a local instance of this job's own (token authentication, its files in " in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "dtrain: error: ray: the job failed after 0 restart(s) allowed (--ray-max-failures): worker 1: its process died"
    ), last
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ray").experiment_id])
    assert run.info.status != "RUNNING"  # rank 0 closed it as the group broke


def test_a_run_its_stopped_workers_left_running_is_closed_by_the_launching_process(tmp_path):
    from dtrain.train.ray_job import close_left_running

    uri = mlflow_store(tmp_path)
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("ray")
    ours, other = (client.create_run(experiment) for _ in range(2))
    client.log_param(ours.info.run_id, "output_dir", str(tmp_path / "ours"))
    client.log_param(other.info.run_id, "output_dir", str(tmp_path / "other"))
    close_left_running(CNN, [f"output_dir={tmp_path / 'ours'}", f"tracking.uri={uri}", "tracking.experiment=ray"])
    assert client.get_run(ours.info.run_id).info.status == "FAILED"
    assert client.get_run(other.info.run_id).info.status == "RUNNING"  # another job's: untouched


def _initial_cnn() -> dict[str, torch.Tensor]:
    from dtrain.tasks import get_task
    from dtrain.train.config import load_config

    cfg = load_config(CNN, TINY_CNN)
    task = get_task(cfg.task)(cfg)
    task.datasets()
    torch.manual_seed(cfg.seed)
    return task.models()["model"].module.state_dict()
