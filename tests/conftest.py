"""Test fixtures, in the manner of Lightning's test suite: the environment and the default
process group are restored after every test, and a real `mlflow server` is one fixture."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest
import torch.distributed as dist

# The tests mirror the package's folders; what they share (helpers, the test tasks, the matrix)
# is in support/, on the path of every test module and of every rank they start.
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

from helpers import LM, TINY_LM, MlflowServer, check, run_dtrain


def pytest_configure(config: pytest.Config) -> None:
    # Ranks share 2 cores in CI: one intra-op thread per process avoids oversubscription.
    # Set before any test starts, for this process and every rank it launches.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The interpreter's console scripts first, as in an activated venv and in every command the
    # tests run: DeepSpeed's JIT-built op is then built and found by the same ninja everywhere
    # (another ninja's build log reads as stale and rebuilds it, ~20 s each time).
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


# The longest module fixtures and tests, started first: under `-n 2` the suite's last minutes
# are then short tests on both workers, not one 4-minute fixture on one while the other idles.
LONGEST_FIRST = (
    "test_matrix.py",
    "test_compare.py",
    "test_first_hour.py",
    "test_search.py",
    "test_faults.py",
    "test_launchers.py",
    "test_resume.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    order = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: the rest as collected


# Modules whose tests share a module- or class-scoped fixture (a trained matrix, runs, a server).
SHARED = {
    str(path.relative_to(Path(__file__).parents[1]))
    for path in Path(__file__).parent.rglob("test_*.py")
    if re.search(r"@pytest\.fixture\(scope=\"(module|class)\"", path.read_text())
}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's `load` scheduling, except that the tests of a module in SHARED go to one worker
    (as a unit): under `load` both workers could build its fixture. (`--dist loadgroup` would
    say it with marks, but xdist 3.8 cannot rename nodes under pytest 9.)"""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # keep LONGEST_FIRST's order

    class Shared(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in SHARED else nodeid

    return Shared(config, log)


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


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_runs(name, *overrides, recipe=LM, base=TINY_LM, nproc=2)`: a short real training
    run, trained once per session and shared by every test that names it (the DDP baselines
    the DeepSpeed and FSDP engines are compared against). Overrides with `resume=auto` run again."""
    root = tmp_path_factory.mktemp("runs")
    asked: dict[str, tuple] = {}

    def run(name: str, *overrides: str, recipe: str = LM, base: Sequence[str] = TINY_LM, nproc: int = 2) -> Path:
        out = root / name
        if not overrides and name in asked:  # a look-up of a run trained earlier under its own overrides
            return out
        if "resume=auto" not in overrides:  # one name, one run: a second definition would get the first's
            assert asked.setdefault(name, (overrides, recipe, tuple(base), nproc)) == (
                overrides,
                recipe,
                tuple(base),
                nproc,
            ), f"tiny_runs({name!r}) asked differently"
        if not (out / "model.pt").exists() or "resume=auto" in overrides:
            check(run_dtrain(["train", recipe, *base, f"output_dir={out}", *overrides], cwd=root, nproc=nproc))
        return out

    return run


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster from the installed server binaries (initdb refuses root,
    so it runs as the `postgres` user), on a free loopback port; yields its SQLAlchemy URL."""
    import pwd
    import shutil
    import subprocess
    import tempfile

    from helpers import free_port

    bindir = (
        subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
        if shutil.which("pg_config")
        else ""
    )
    if not bindir or not Path(bindir, "initdb").exists():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no `postgres` user to run initdb as")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="dtrain-pg-"))  # not under pytest's 0700 tree: postgres must enter it
    data = root / "data"
    shutil.chown(root, "postgres")
    port = free_port()
    subprocess.run(
        [*as_postgres, f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_postgres,
            f"{bindir}/pg_ctl",
            "-D",
            str(data),
            "-l",
            str(root / "log"),
            "-w",
            "-o",
            f"-p {port} -c listen_addresses=127.0.0.1 -k {root}",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    subprocess.run([*as_postgres, f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)
