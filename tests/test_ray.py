"""dtrain as a Ray Train job (`dtrain train RECIPE --ray-workers N`) on a local Ray instance of
this machine's 2 CPUs: the workers train on the process group Ray makes, to torchrun's
parameters, and a worker SIGKILLed mid-run is restarted by Ray and resumes exactly, in the
same MLflow run."""

from __future__ import annotations

import json
import os
import subprocess

import mlflow
import pytest
import torch

from dtrain.environments import read_env
from helpers import CNN, DDP_BASELINE, PY, ROOT, TINY_CNN, check, env_for_cli, load_params, max_param_diff, run_dtrain, spawn

pytest.importorskip("ray.train.torch", reason='Ray Train is not installed (pip install -e ".[ray]")')

RAY = ["--ray-workers", "2"]
# Ray's own services (GCS, raylet, dashboard agent) are heavy beside 2 training workers on 2 cores.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def test_a_ray_worker_environment_is_read_as_ray():
    env = read_env({"RAY_JOB_ID": "01000000", "RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                    "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "4000"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.num_nodes) == ("ray", 1, 4, 1, 2)
    assert read_env({"RANK": "1", "WORLD_SIZE": "4"}).launcher == "env"  # Ray's marker missing: not Ray


def test_bad_ray_options_are_refused_before_ray_starts(tmp_path):
    proc = run_dtrain(["train", CNN, "--ray-workers", "2", "--ray-max-failures", "-1"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--ray-max-failures=-1" in proc.stderr
    proc = run_dtrain(["train", CNN, "--ray-workers", "3", "data.global_batch_size=64"], cwd=tmp_path)
    assert proc.returncode == 2 and "data.global_batch_size=64" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_ray_workers_train_the_cnn_to_the_parameters_of_torchrun_ranks(tmp_path, tiny_runs):
    reference = tiny_runs("cnn-ddp", *DDP_BASELINE, recipe=CNN, base=TINY_CNN)
    out = tmp_path / "ray"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = check(run_dtrain(["train", CNN, *TINY_CNN, *DDP_BASELINE, f"output_dir={out}", "tracking.enabled=true",
                             f"tracking.uri={uri}", *RAY], cwd=tmp_path, **RAY_ENV))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 20
    run = mlflow.MlflowClient(uri).get_run(summary["run_id"])
    assert run.data.tags["dtrain.launcher"] == "ray" and run.info.status == "FINISHED", proc.stderr[-2000:]
    ray_params, torchrun_params = load_params(out / "model.pt"), load_params(reference / "model.pt")
    assert max_param_diff(ray_params, torchrun_params, buffers=True) <= 1e-6
    # What the bound tells apart: 20 steps moved every parameter tensor far beyond it.
    init = _initial_cnn()
    assert max_param_diff(ray_params, init) > 1e-2


def _initial_cnn() -> dict[str, torch.Tensor]:
    from dtrain.tasks import get_task, load_config

    cfg = load_config(CNN, TINY_CNN)
    task = get_task(cfg.task)(cfg)
    task.datasets()
    torch.manual_seed(cfg.seed)
    return task.models()["model"].module.state_dict()


def _straight(rank: int, world: int, out: str, overrides: list[str]) -> None:
    from dtrain.distributed import DistEnv
    from dtrain.tasks import load_config
    from dtrain.trainer import fit

    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    fit(load_config(CNN, [*overrides, f"output_dir={out}"]), DistEnv(rank=rank, world_size=world, local_world_size=world),
        torch.device("cpu"))


FAULTY = ["task=faulty:FaultyTask", "model.hidden=32", "data.augment=false", "train.max_steps=24",
          "checkpoint.every_steps=5", "train.eval_every_steps=0"]


@pytest.mark.slow
def test_a_sigkilled_ray_worker_is_restarted_and_the_job_resumes_exactly_in_one_mlflow_run(tmp_path):
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    # Through the Python API of examples/ray (the CLI's --ray-max-failures builds the same trainer).
    proc = subprocess.run([PY, str(ROOT / "examples" / "ray" / "train_on_ray.py"), CNN, *FAULTY, "model.fault=kill:1:13",
                           f"output_dir={out}", f"tracking.uri={uri}", "tracking.experiment=ray", "tracking.log_every=4",
                           "--workers", "2", "--max-failures", "1"],
                          cwd=tmp_path, env=env_for_cli(**RAY_ENV), capture_output=True, text=True, timeout=600)
    check(proc)
    assert (out / ".killed-rank1").exists()  # the fault happened: rank 1 died by SIGKILL before step 13
    assert "resumed at step 10" in proc.stdout + proc.stderr  # the new group continued from the newest checkpoint
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["samples_seen"] == 24 * 64
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ray").experiment_id])
    assert run.info.run_id == summary["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["dtrain.resumed"] == "true"
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}) == list(range(4, 25, 4))
    # Exactly where an uninterrupted run ends (the same 2 ranks, without the fault).
    spawn(_straight, 2, str(tmp_path / "straight"), [*FAULTY, "tracking.enabled=false"])
    assert max_param_diff(load_params(out / "model.pt"), load_params(tmp_path / "straight" / "model.pt")) <= 1e-6
