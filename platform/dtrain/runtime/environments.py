"""Which launcher started this process, and what it says about the job: one small detector
per launcher environment, tried in order (Lightning Fabric's `ClusterEnvironment.detect()`).

Launchers agree on little. torchrun, `accelerate launch` and the `deepspeed` launcher set
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (plus their own extras); `srun`
sets SLURM_* only; a Kubeflow PyTorchJob pod run without torchrun gets the *node* rank in
RANK and PET_*. Each becomes one `DistEnv`. Imports nothing heavy: no torch.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping

from dtrain.errors import LaunchError as LaunchError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"
    """single, torchrun, accelerate, deepspeed, ray, slurm, env or kubeflow."""


Env = Mapping[str, str]


def _rank_env(env: Env) -> bool:
    """RANK/WORLD_SIZE style (torchrun and friends). A PyTorchJob pod also has RANK and
    WORLD_SIZE, but per pod: it counts only when torchrun runs inside the pod."""
    return ("RANK" in env and "WORLD_SIZE" in env and "PET_NNODES" not in env) or "TORCHELASTIC_RUN_ID" in env


def _from_rank_env(env: Env, launcher: str) -> DistEnv:
    get = env.get
    world = int(get("WORLD_SIZE", 1))
    local_world = int(get("LOCAL_WORLD_SIZE") or get("LOCAL_SIZE") or get("SLURM_NTASKS_PER_NODE") or world)
    nodes = int(get("GROUP_WORLD_SIZE") or get("CROSS_SIZE") or get("SLURM_NNODES") or max(1, world // local_world))
    return DistEnv(
        int(get("RANK", 0)),
        world,
        int(get("LOCAL_RANK", 0)),
        local_world,
        nodes,
        get("MASTER_ADDR", "127.0.0.1"),
        int(get("MASTER_PORT", 29500)),
        launcher,
    )


class Accelerate:
    """`accelerate launch`: torchrun's elastic launcher plus ACCELERATE_* settings."""

    @staticmethod
    def detect(env: Env) -> bool:
        return _rank_env(env) and ("ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_DYNAMO_BACKEND" in env)

    @staticmethod
    def read(env: Env) -> DistEnv:
        return _from_rank_env(env, "accelerate")


class TorchElastic:
    """torchrun (and a Kubeflow pod running torchrun, which reads PET_* itself)."""

    @staticmethod
    def detect(env: Env) -> bool:
        return "TORCHELASTIC_RUN_ID" in env

    @staticmethod
    def read(env: Env) -> DistEnv:
        return _from_rank_env(env, "torchrun")


class DeepSpeedLauncher:
    """The `deepspeed` launcher (CROSS_* for nodes, LOCAL_SIZE per node)."""

    @staticmethod
    def detect(env: Env) -> bool:
        return _rank_env(env) and ("CROSS_RANK" in env or "LOCAL_SIZE" in env)

    @staticmethod
    def read(env: Env) -> DistEnv:
        return _from_rank_env(env, "deepspeed")


class RayTrain:
    """A Ray Train worker (`dtrain train --ray-workers N`, or a user's own TorchTrainer): Ray
    made the process group and exports torchrun's variables, plus NODE_RANK, in its actor."""

    @staticmethod
    def detect(env: Env) -> bool:
        return _rank_env(env) and "RAY_JOB_ID" in env and "NODE_RANK" in env

    @staticmethod
    def read(env: Env) -> DistEnv:
        return _from_rank_env(env, "ray")


class RankVariables:
    """Any other launcher that exports RANK / WORLD_SIZE (an sbatch script under srun: slurm)."""

    @staticmethod
    def detect(env: Env) -> bool:
        return _rank_env(env)

    @staticmethod
    def read(env: Env) -> DistEnv:
        return _from_rank_env(env, "slurm" if "SLURM_PROCID" in env else "env")


class KubeflowPod:
    """A PyTorchJob pod (or a Trainer v2 TrainJob pod: PET_* only) started without torchrun. In a
    PyTorchJob RANK is the pod (node) index and WORLD_SIZE
    is pods x nprocPerNode, so one process per pod is all that can run."""

    @staticmethod
    def detect(env: Env) -> bool:
        return "PET_NNODES" in env

    @staticmethod
    def read(env: Env) -> DistEnv:
        get = env.get
        nproc = get("PET_NPROC_PER_NODE", "1")
        if nproc not in ("1", "auto"):
            raise LaunchError(
                f"PET_NPROC_PER_NODE={nproc}: a PyTorchJob with nprocPerNode > 1 must run "
                "`torchrun ... -m dtrain train ...` as its command (torchrun reads PET_*)"
            )
        nodes = int(str(get("PET_NNODES")).split(":")[-1])
        rank = int(get("PET_NODE_RANK") or get("RANK", "0"))
        return DistEnv(
            rank,
            nodes,
            0,
            1,
            nodes,
            get("MASTER_ADDR") or get("PET_MASTER_ADDR", "127.0.0.1"),
            int(get("MASTER_PORT") or get("PET_MASTER_PORT", "23456")),
            "kubeflow",
        )


class Srun:
    """`srun python -m dtrain train ...`: one task per rank, rendezvous on the first node."""

    @staticmethod
    def detect(env: Env) -> bool:
        return "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1

    @staticmethod
    def read(env: Env) -> DistEnv:
        get = env.get
        job = int(get("SLURM_JOB_ID", 0))
        return DistEnv(
            int(get("SLURM_PROCID", 0)),
            int(get("SLURM_NTASKS", 1)),
            int(get("SLURM_LOCALID", 0)),
            int(get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]),
            int(get("SLURM_NNODES", 1)),
            get("MASTER_ADDR") or _slurm_head_node(env),
            int(get("MASTER_PORT") or 20000 + job % 20000),
            "slurm",
        )


def _slurm_head_node(env: Env) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    if shutil.which("scontrol") and nodelist:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)  # nosec B603 B607 # SLURM's own tool, fixed argv
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    if env.get("SLURM_LAUNCH_NODE_IPADDR"):
        return env["SLURM_LAUNCH_NODE_IPADDR"]
    raise LaunchError("SLURM: cannot find the head node; export MASTER_ADDR in the batch script")


DETECTORS = (Accelerate, TorchElastic, DeepSpeedLauncher, RayTrain, RankVariables, KubeflowPod, Srun)
"""In order: the first whose `detect` holds reads the environment; none: one process."""


def read_env(env: Env) -> DistEnv:
    """Normalise the launcher's environment variables into a DistEnv."""
    for detector in DETECTORS:
        if detector.detect(env):
            return detector.read(env)
    return DistEnv()
