"""The rank bootstrap reads every launcher's environment into the same DistEnv."""

import os

import pytest

from dtrain.errors import LaunchError
from dtrain.runtime.distributed import DistEnv, read_env


def test_single_process():
    assert read_env({}) == DistEnv()


def test_torchrun():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29400",
        "TORCHELASTIC_RUN_ID": "job",
    }
    assert read_env(env) == DistEnv(3, 4, 1, 2, 2, "10.0.0.1", 29400, "torchrun")


def test_accelerate_launch():
    # accelerate launch runs torchrun's elastic launcher and adds ACCELERATE_* settings.
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "none",
        "ACCELERATE_MIXED_PRECISION": "no",
    }
    e = read_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (1, 2, 1, "accelerate")


def test_deepspeed_launcher():
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "4",
        "CROSS_RANK": "1",
        "CROSS_SIZE": "2",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29500",
    }
    assert read_env(env) == DistEnv(5, 8, 1, 4, 2, "node0", 29500, "deepspeed")


def test_srun_without_torchrun():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS_PER_NODE": "4(x2)",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "123456",
        "SLURM_LAUNCH_NODE_IPADDR": "10.1.2.3",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
    }
    e = read_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.num_nodes) == (5, 8, 1, 4, 2)
    assert e.launcher == "slurm" and e.master_port == 20000 + 123456 % 20000
    assert e.master_addr in ("10.1.2.3", "gpu01")  # scontrol's answer when SLURM is installed
    assert read_env({**env, "MASTER_ADDR": "head"}).master_addr == "head"


def test_srun_single_task_is_single_process():
    assert read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "single"


def test_kubeflow_pytorchjob_pod_without_torchrun():
    # What training-operator v1.9 injects into Worker pod index 0 of a Master + 2 Workers
    # job with nprocPerNode=1: RANK is the pod's rank (workers are offset by the master).
    env = {
        "MASTER_ADDR": "job-master-0",
        "MASTER_PORT": "23456",
        "WORLD_SIZE": "3",
        "RANK": "1",
        "PET_NPROC_PER_NODE": "1",
        "PET_NODE_RANK": "1",
        "PET_NNODES": "3",
        "PYTHONUNBUFFERED": "0",
    }
    assert read_env(env) == DistEnv(1, 3, 0, 1, 3, "job-master-0", 23456, "kubeflow")


def test_kubeflow_trainer_v2_pod_without_torchrun():
    # What Trainer v2's Torch plugin injects into pod 1 of a TrainJob with numNodes 2 and
    # numProcPerNode 1: PET_* only (no MASTER_ADDR, RANK or WORLD_SIZE).
    env = {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "1",
        "PET_NODE_RANK": "1",
        "PET_MASTER_ADDR": "job-node-0-0.job",
        "PET_MASTER_PORT": "29500",
    }
    assert read_env(env) == DistEnv(1, 2, 0, 1, 2, "job-node-0-0.job", 29500, "kubeflow")


def test_kubeflow_multi_process_pod_needs_torchrun():
    env = {
        "MASTER_ADDR": "m",
        "MASTER_PORT": "23456",
        "WORLD_SIZE": "8",
        "RANK": "1",
        "PET_NPROC_PER_NODE": "4",
        "PET_NODE_RANK": "1",
        "PET_NNODES": "2",
    }
    with pytest.raises(LaunchError, match="PET_NPROC_PER_NODE=4"):
        read_env(env)
    # ... and under torchrun in that pod, torchrun's own RANK/WORLD_SIZE win.
    env.update(TORCHELASTIC_RUN_ID="x", RANK="6", WORLD_SIZE="8", LOCAL_RANK="2", LOCAL_WORLD_SIZE="4")
    e = read_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (6, 8, 2, "torchrun")


def test_backend_is_nccl_with_a_gpu_per_rank_and_gloo_when_ranks_share_one():
    from dtrain.runtime.distributed import pick_backend

    assert pick_backend("cuda", 8, 8) == "nccl" and pick_backend("cuda", 1, 1) == "nccl"
    assert pick_backend("cuda", 2, 1) == "gloo"  # two ranks on one GPU: NCCL would refuse
    assert pick_backend("cpu", 2, 0) == "gloo"


def test_each_rank_dtrain_starts_gets_its_share_of_the_cores(monkeypatch):
    """1 process gets every core this process may use, N ranks a 1/N share each (at least 1);
    a user's OMP_NUM_THREADS wins. torchrun's own default would be 1 per rank on any host."""
    from dtrain.runtime import launch

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launch.threads_per_rank(1) == cores and launch.threads_per_rank(cores * 4) == 1
    assert launch.torchrun_env(nproc=2)["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert launch.rank_threads(2) == max(1, cores // 2)
    assert "OMP_NUM_THREADS" not in launch.torchrun_env()  # no ranks named: torchrun decides
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launch.torchrun_env(nproc=2)["OMP_NUM_THREADS"] == "3" and launch.rank_threads(2) == 3
