"""Shared test helpers: real multi-process runs (gloo), the dtrain CLI, a BN-free user task."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from warm import call as call_warm
from warm import run as run_warm

from dtrain.config import Config
from dtrain.runtime.distributed import shutdown
from dtrain.runtime.launch import torchrun_cmd, torchrun_env
from dtrain.tasks.cnn import CNNModelConfig, CNNTask

ROOT = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent
"""Test tasks (faulty, planted, streamed) and this module: on the Python path of every rank the tests start."""
PY = sys.executable
LM = str(ROOT / "recipes" / "transformer_charlm.yaml")
CNN = str(ROOT / "recipes" / "cnn_digits.yaml")
# A small LM so that 20 steps take seconds; fp32, clipping on.
TINY_LM = [
    "train.max_steps=20",
    "tracking.enabled=false",
    "model.n_layer=2",
    "model.n_embd=64",
    "model.n_head=4",
    "model.block_size=64",
    "data.global_batch_size=16",
    "data.max_chars=200000",
    "train.eval_every_steps=0",
    "checkpoint.every_steps=0",
    "optim.clip_grad_norm=0.5",
]
# The DDP baselines the other engines are compared with (`tiny_runs("ddp" / "cnn-ddp", *DDP_BASELINE)`):
# with an EMA, which changes no training step, so that its evaluation can be compared too.
DDP_BASELINE = ("ema.decay=0.9",)
# The digits CNN (synchronised BatchNorm), 20 steps, no augmentation.
TINY_CNN = [
    "tracking.enabled=false",
    "train.max_steps=20",
    "data.augment=false",
    "checkpoint.every_steps=0",
    "train.eval_every_steps=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, store: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # A file store, not a TCP port: no port to race for between tests.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    fn(rank, world, *args)
    shutdown()  # the CLI's teardown: barrier, destroy, then wait until every rank has destroyed


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` real processes joined by a gloo process group.
    An assertion failing in any rank fails the caller. The ranks start as
    `torch.multiprocessing.spawn` starts them (this process's environment and path, a
    function of an importable module), from the worker's warm interpreters (`warm.py`): a
    fresh one would import torch and dtrain again, 2-3 s of CPU each."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        call_warm(_entry, [(rank, world, store, fn, args) for rank in range(world)])


def trained_once(tmp_path_factory, name: str, train) -> Path:
    """A folder that `train(folder)` fills once per test session: the first xdist worker to ask
    trains (behind a file lock), another that asks meanwhile waits, later ones read it."""
    from filelock import FileLock

    session = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    base = tmp_path_factory.getbasetemp()
    root = base.parent / f"{name}-{session}" if session else base / name
    root.mkdir(exist_ok=True)
    with FileLock(str(root / "runs.lock")):
        if not (root / "trained").exists():
            train(root)
            (root / "trained").touch()
    return root


def mlflow_store(folder: Path, name: str = "mlflow.db") -> str:
    """The URI of a SQLite MLflow store `folder/name`: a copy of one made once per test session,
    unless it is there already. MLflow makes a new store's tables by running its schema
    migrations, ~2 s of CPU in each process that opens a new one."""
    import shutil

    from filelock import FileLock

    from dtrain.tracking.mlflow_tracker import open_client

    db = Path(folder) / name
    if not db.exists():
        session = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
        template = Path(tempfile.gettempdir()) / f"dtrain-mlflow-template-{session}.db"
        with FileLock(f"{template}.lock"):
            if not template.exists():
                made = template.with_suffix(".new")
                open_client(f"sqlite:///{made}").search_experiments()
                made.rename(template)
        shutil.copyfile(template, db)
    return f"sqlite:///{db}"


def _dtrain_modules() -> list[str]:
    import pkgutil

    import dtrain as package

    return ["dtrain", *(m.name for m in pkgutil.walk_packages(package.__path__, "dtrain."))]


# -W's module field is matched literally, so every module of dtrain is named: a deprecation
# raised from dtrain's own code is an error in the ranks the tests start, as in pytest itself.
STRICT_WARNINGS = ",".join(
    f"error::{kind}:{m}" for m in _dtrain_modules() for kind in ("FutureWarning", "DeprecationWarning")
)


def env_for_cli(**extra: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCHELASTIC", "PET_", "SLURM_"))
    }
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # Console scripts (torchrun, accelerate, deepspeed, dtrain) of the interpreter running the tests.
    env["PATH"] = os.pathsep.join([str(Path(PY).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = STRICT_WARNINGS
    for key, value in extra.items():  # None: left out, as on a machine where it is not set
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_dtrain(
    args: list[str], cwd: Path, nproc: int = 0, timeout: int = 600, warm: bool = True, job: str = "", **env
) -> subprocess.CompletedProcess:
    """`dtrain ARGS` as one process, or `dtrain train|check` on `nproc` ranks on loopback, with
    the environment `dtrain train --nproc-per-node` gives torchrun (and the rendezvous id `job`
    in place of a fresh one). `warm`: forked from the worker's warm interpreters (`warm.py`: the
    ranks torchrun would start, without its agent); else fresh interpreters, the ranks under
    torchrun, for the tests of the launch itself."""
    if nproc:
        assert args[0] in ("train", "check"), args
        cmd, run_env = torchrun_cmd(nproc, args[1], args[2:], command=args[:1]), torchrun_env(env_for_cli(**env))
        cmd = [f"--rdzv-id={job}" if job and a.startswith("--rdzv-id=") else a for a in cmd]
    else:
        cmd, run_env = [PY, "-m", "dtrain", *args], env_for_cli(**env)
    if warm:
        return run_warm(args, cwd, run_env, nproc=nproc, timeout=timeout, job=job)
    return subprocess.run(cmd, cwd=cwd, env=run_env, capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    )
    return proc


def load_params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], buffers: bool = False) -> float:
    keys = [k for k in a if a[k].is_floating_point() and (buffers or "running" not in k)]
    assert keys and set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


# ------------------------------------------------------------------ a user task (import path)


@dataclass
class MLPModelConfig(CNNModelConfig):
    hidden: int = 64


@dataclass
class MLPConfig(Config):
    model: MLPModelConfig = field(default_factory=MLPModelConfig)


class MLPTask(CNNTask):
    """Digits with a BatchNorm-free MLP: accumulation must equal a large batch exactly."""

    config_class = MLPConfig

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, self.cfg.model.hidden), nn.Tanh(), nn.Linear(self.cfg.model.hidden, 10)
        )


# ------------------------------------------------------------------ a real MLflow server


class MlflowServer:
    """`mlflow server` on loopback (1 web worker, no job runners: light on 2 cores)."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = None

    def start(self, timeout: float = 90) -> MlflowServer:
        import time
        import urllib.request

        cmd = [
            PY,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root}/server.db",
            "--artifacts-destination",
            (self.root / "artifacts").as_uri(),
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.log = open(self.root / "server.log", "w")
        self.proc = subprocess.Popen(
            cmd, cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return self
            except OSError:
                time.sleep(0.5)
            if self.proc.poll() is not None:
                break
        raise RuntimeError(f"mlflow server did not start:\n{(self.root / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the web worker is a child: take the group
            self.proc.wait()
        if self.log is not None:
            self.log.close()


# ------------------------------------------------------------------ an image folder on disk


def write_image_folder(root: Path, classes: int = 3, per_class: int = 24, size: int = 20, seed: int = 0) -> Path:
    """`root/<class>/<i>.png`: class k is a noisy image whose k-th colour channel is bright,
    with a bright square at a random place (what a CNN learns in a few steps)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(classes):
        (root / f"class{k}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            img[..., k % 3] += 120
            y, x = rng.integers(0, size - 6, 2)
            img[y : y + 6, x : x + 6] = 255
            Image.fromarray(img).save(root / f"class{k}" / f"{i:03d}.png")
    return root


class FakeRun:
    """What a feature sees of its job (`dtrain.protocols.Run`), for unit tests of one feature
    without a loop: a recipe, engines, a step the test moves, and what the feature asked for."""

    def __init__(self, cfg, engines=None, global_batch: int = 64, task=None, metrics: list[str] = ()):
        from dtrain.protocols import Clock

        self.cfg, self.engines, self.global_batch, self.task = cfg, engines or {}, global_batch, task
        self.world_size, self.total_steps, self.step, self.resumed, self.settled_from = 1, 100, 0, False, 0
        self.output_dir, self.clock, self.device = Path(cfg.output_dir), Clock(), torch.device("cpu")
        self.names, self.lines, self.logged, self.asked, self.stopped = list(metrics), [], [], [], None

    def say(self, line):
        self.lines.append(line)

    def log(self, metrics):
        self.logged.append(metrics)

    def metric_names(self):
        return self.names

    def request_checkpoint(self, best=False):
        self.asked.append((self.step, best))

    def checkpoint_folder(self, step):
        return self.output_dir / "checkpoints" / f"step_{step:08d}"

    def stop(self, reason, halt=False):
        self.stopped = (reason, halt)
