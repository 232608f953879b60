"""Test fixtures, in the manner of Lightning's test suite: the environment and the default
process group are restored after every test, and a real `mlflow server` is one fixture."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import torch.distributed as dist

from helpers import MlflowServer


def pytest_configure(config: pytest.Config) -> None:
    # Ranks share 2 cores in CI: one intra-op thread per process avoids oversubscription.
    # Set before any test starts, for this process and every rank it launches.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def restore_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test sees, and leaves, the same environment; no test may write to a tracking
    store outside its tmp dir."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def teardown_process_group() -> Iterator[None]:
    """A test that started a process group in this process never leaks it into the next."""
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """`mlflow server` on loopback with its own SQLite store, stopped after the test."""
    server = MlflowServer(tmp_path).start()
    yield server
    server.stop()
