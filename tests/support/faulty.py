"""A user task that misbehaves on purpose, for the fault tests (test-only fault injection:
nothing of this reaches a production run). Named in recipes as `faulty:FaultyTask`.

`model.fault` is `KIND:RANK:STEP`:
    hang        that rank stalls before that step (a collective then times out)
    raise       that rank's task code raises at that step (a bug in user code)
    unreadable  that rank fails to open its data file while building datasets (STEP unused)
    fill_disk   that rank fills the file system of output_dir at that step (real ENOSPC later)
    slow_eval   that rank's evaluations take STEP seconds more (it prints "slow evaluation" first)
    nan         from that step on, every rank's inputs are NaN (RANK unused): non-finite gradients
    kill        that rank SIGKILLs itself before that step, in a job's first attempt only
                (TORCHELASTIC_RESTART_COUNT 0 and no .killed-rankN marker in output_dir yet), as
                the OOM killer or a lost node would
    slow_checkpoint  that rank's checkpoints take 0.1 s more before that step, 0.8 s more from it on;
                its steps 5 ms more (a step time that does not depend on the machine's load)
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import MLPConfig, MLPModelConfig, MLPTask
from torch.utils.data import Subset

from dtrain.tasks.cnn import CNNTask


@dataclass
class FaultyModelConfig(MLPModelConfig):
    fault: str = ""
    """KIND:RANK:STEP (see the module docstring); empty: behave."""
    eval_size: int = 0
    """Keep only the first N evaluation samples (0: all), e.g. an odd count for unequal shards."""


@dataclass
class FaultyConfig(MLPConfig):
    task: str = "faulty:FaultyTask"
    model: FaultyModelConfig = field(default_factory=FaultyModelConfig)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class FaultyTask(MLPTask):
    config_class = FaultyConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        kind, rank, step = (cfg.model.fault.split(":") + ["", "", ""])[:3] if cfg.model.fault else ("", "", "")
        self.kind, self.rank, self.at = kind, int(rank or -1), int(step or -1)
        self.steps = 0

    def datasets(self):
        if self.kind == "unreadable" and self.rank == _rank():
            open(Path(self.cfg.output_dir) / "shard-only-on-the-other-node.bin", "rb")  # a real FileNotFoundError
        train, test = super().datasets()
        if self.cfg.model.eval_size:
            test = Subset(test, range(self.cfg.model.eval_size))
        return train, test

    def train_step(self, engines, micro_batches, terms=None):
        self.steps += 1
        if self.kind == "slow_checkpoint" and self.rank == _rank():
            time.sleep(0.005)
        if self.kind == "nan" and self.steps >= self.at:
            micro_batches = [(x * float("nan"), y) for x, y in micro_batches]
        if self.rank == _rank() and self.at == self.steps:
            if self.kind == "hang":
                while True:
                    time.sleep(1)
            if self.kind == "raise":
                raise RuntimeError(f"boom in user code on rank {self.rank} at step {self.steps}")
            if self.kind == "fill_disk":
                _fill(Path(self.cfg.output_dir) / "filler")
            marker = (
                Path(self.cfg.output_dir) / f".killed-rank{self.rank}"
            )  # for launchers that count no restarts (Ray)
            if self.kind == "kill" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return super().train_step(engines, micro_batches, terms)

    def extra_state(self):
        if self.kind == "slow_checkpoint" and self.rank == _rank():
            time.sleep(0.1 if self.steps < self.at else 0.8)
        return super().extra_state()

    def eval_sums(self, model, batch):
        self.forwards = getattr(self, "forwards", 0) + 1
        return super().eval_sums(model, batch)

    def evaluate(self, engines, loader, device):
        """The metrics plus the evaluation forwards each rank ran (ZeRO-3 needs them equal)."""
        self.forwards = 0
        if self.kind == "slow_eval" and self.rank == _rank():
            print("slow evaluation", flush=True)
            time.sleep(self.at)
        metrics = super().evaluate(engines, loader, device)
        world = dist.get_world_size() if dist.is_initialized() else 1
        counts = [torch.zeros(1) for _ in range(world)]
        if world > 1:
            dist.all_gather(counts, torch.tensor([float(self.forwards)]))
        else:
            counts = [torch.tensor([float(self.forwards)])]
        return metrics | {f"forwards_rank{r}": float(c) for r, c in enumerate(counts)}


def _fill(path: Path) -> None:
    """Write until the file system is full (a real ENOSPC), keeping the file."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
        os.fsync(f.fileno())


class KillOnceCNN(CNNTask):
    """The CNN recipe's own task, except that rank R SIGKILLs itself before its attempt's step S,
    once per output_dir (`DTRAIN_TEST_KILL=R:S` in the environment; a marker in output_dir
    remembers the death across restarts, for launchers that count none, such as Ray)."""

    def train_step(self, engines, micro_batches, terms=None):
        self.steps = getattr(self, "steps", 0) + 1
        if os.environ.get("DTRAIN_TEST_KILL"):
            rank, step = (int(v) for v in os.environ["DTRAIN_TEST_KILL"].split(":"))
            marker = Path(self.cfg.output_dir) / f".killed-rank{rank}"
            if _rank() == rank and self.steps == step and not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return super().train_step(engines, micro_batches, terms)


class SlowCNN(CNNTask):
    """The CNN recipe's own task, each step 0.2 s longer: a run a test can act on mid-way
    (cut a host's link between two checkpoints) whatever the machine's speed."""

    def train_step(self, engines, micro_batches, terms=None):
        time.sleep(0.2)
        return super().train_step(engines, micro_batches, terms)
