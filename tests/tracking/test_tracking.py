"""MLflow tracking against real stores: a real `mlflow server` over HTTP, an unreachable
store, a store that dies mid-run, and the run status on failure and on Ctrl-C."""

import json
import os
import signal
import subprocess
import time

import mlflow
import pytest
from helpers import PY, ROOT, check, env_for_cli, mlflow_store, run_dtrain

RECIPE = str(ROOT / "recipes" / "cnn_digits.yaml")
SMALL = ["model.widths=[16]", "model.blocks_per_stage=1", "data.augment=false"]  # the recipe's CNN, a quarter of it


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "MLflow tracking" in line]


@pytest.mark.slow
def test_two_ranks_into_a_real_mlflow_server(mlflow_server, tmp_path):
    check(
        run_dtrain(
            [
                "train",
                RECIPE,
                "train.max_steps=30",
                "tracking.log_every=10",
                f"tracking.uri={mlflow_server.uri}",
                "tracking.experiment=http",
                f"output_dir={tmp_path / 'out'}",
            ],
            cwd=tmp_path,
            nproc=2,
        )
    )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    client = mlflow.MlflowClient(mlflow_server.uri)  # read back over HTTP, as the UI does
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dtrain.world_size"] == "2"
    assert run.data.params["data.global_batch_size"] == "64"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [10, 20, 30]
    assert "eval/accuracy" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "summary.json"}
    assert not (tmp_path / "mlflow.db").exists()  # nothing fell back to a local store


def test_the_last_line_says_where_the_run_is_and_how_to_see_it(tmp_path):
    uri = mlflow_store(tmp_path)
    proc = check(
        run_dtrain(
            ["train", RECIPE, "train.max_steps=2", f"tracking.uri={uri}", f"output_dir={tmp_path / 'out'}"],
            cwd=tmp_path,
        )
    )
    run_id = json.loads((tmp_path / "out" / "summary.json").read_text())["run_id"]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("done: 2 steps | eval loss ") and " accuracy " in last, last
    assert last.endswith(
        f"{tmp_path / 'out'} (model.safetensors, summary.json) | mlflow run {run_id}; "
        f"to see it: mlflow ui --backend-store-uri {uri}"
    ), last
    params = mlflow.MlflowClient(uri).get_run(run_id).data.params  # what MLflow's compare view shows
    assert (params["world_size"], params["per_rank_batch_size"], params["data.global_batch_size"]) == ("1", "64", "64")


def test_unreachable_store_warns_once_and_trains(tmp_path):
    proc = check(
        run_dtrain(
            [
                "train",
                RECIPE,
                "train.max_steps=20",
                "tracking.uri=http://127.0.0.1:9",
                f"output_dir={tmp_path / 'out'}",
            ],
            cwd=tmp_path,
        )
    )
    assert len(warnings_in(proc.stderr)) == 1, proc.stderr
    assert "unavailable, training without it" in warnings_in(proc.stderr)[0]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 20


@pytest.mark.slow
def test_silent_store_host_costs_seconds_not_retries(tmp_path):
    """A host that accepts the connection and never answers (a hung proxy, a dead server
    behind a live load balancer): MLflow's client would retry 10 s requests while the other
    ranks wait for rank 0; a bounded probe warns once and training goes on."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes handshakes; nobody ever reads or replies
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        proc = check(
            run_dtrain(
                ["train", RECIPE, "train.max_steps=10", f"tracking.uri={uri}", f"output_dir={tmp_path / 'out'}"],
                cwd=tmp_path,
                nproc=2,
            )
        )
    (warning,) = warnings_in(proc.stderr)
    assert "unavailable, training without it: no answer within 5s" in warning, proc.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 10


def _wait_for_running_run(uri: str, experiment: str, proc: subprocess.Popen, timeout: float = 120):
    from dtrain.tracking import open_client

    client = open_client(uri)  # a store the run is creating at this moment: see the test below
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and runs[0].info.status == "RUNNING" and "train/loss" in runs[0].data.metrics:
            return runs[0].info.run_id
        time.sleep(0.3)
    proc.kill()  # not left training for the rest of the suite
    out, err = proc.communicate()
    raise AssertionError(f"the run never showed up as RUNNING with metrics (exit {proc.returncode}):\n{err[-3000:]}")


_OPEN_AT = """
import sys
import mlflow
from dtrain.tracking import open_client
print("ready", flush=True)
sys.stdin.readline()  # every process past its imports: they open the store together
client = open_client(sys.argv[1]) if sys.argv[2] == "locked" else mlflow.MlflowClient(sys.argv[1])
client.search_experiments()
"""


@pytest.mark.parametrize("how", ["locked", pytest.param("bare", marks=pytest.mark.slow)])
def test_processes_opening_a_new_sqlite_store_together_all_get_it(tmp_path, how):
    """MLflow creates a new SQLite store's tables when a client first opens it; processes doing
    so at once fail ("table ... already exists"), and a run that hits it trains untracked.
    `open_client` serialises the creation. Bare clients show the failure it guards against
    (a race: tried up to five fresh stores; two out of three processes failed in trials)."""
    failures = 0
    for attempt in range(1 if how == "locked" else 5):
        uri = f"sqlite:///{tmp_path}/{attempt}.db"
        procs = [
            subprocess.Popen(
                [PY, "-c", _OPEN_AT, uri, how],
                env=env_for_cli(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        for p in procs:
            assert p.stdout.readline() == "ready\n", p.communicate()[1]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        failures += sum(code != 0 for code, _ in results)
        if how == "locked":
            assert failures == 0, [err[-2000:] for code, err in results if code]
        elif failures:
            assert any("already exists" in err or "duplicate column" in err for _, err in results)
            break
    if how == "bare":
        assert failures > 0, "five fresh stores opened together without a clash: the race did not show"


def _start(args, cwd):
    return subprocess.Popen(
        [PY, "-m", "dtrain", "train", RECIPE, *args],
        cwd=cwd,
        env=env_for_cli(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_store_dying_mid_run_warns_once_and_training_finishes(mlflow_server, tmp_path):
    proc = _start(
        [
            "train.max_steps=1500",
            *SMALL,  # ~6 s of steps: flushes (every 5 s) and the end meet the store gone
            "tracking.log_every=5",
            f"tracking.uri={mlflow_server.uri}",
            "tracking.experiment=dies",
            f"output_dir={tmp_path / 'out'}",
        ],
        tmp_path,
    )
    _wait_for_running_run(mlflow_server.uri, "dies", proc)
    mlflow_server.stop()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert len(warnings_in(err)) == 1 and "failed (training continues" in warnings_in(err)[0], err
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 1500


@pytest.mark.slow
def test_ctrl_c_marks_the_run_killed(tmp_path):
    uri = mlflow_store(tmp_path)
    proc = _start(
        [
            "train.max_steps=100000",
            "tracking.log_every=5",
            f"tracking.uri={uri}",
            "tracking.experiment=ctrlc",
            f"output_dir={tmp_path / 'out'}",
        ],
        tmp_path,
    )
    run_id = _wait_for_running_run(uri, "ctrlc", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "dtrain: error: interrupted", err
    assert "Traceback" not in err
    assert mlflow.MlflowClient(uri).get_run(run_id).info.status == "KILLED"


@pytest.mark.slow
def test_training_failure_marks_the_run_failed(tmp_path):
    uri = mlflow_store(tmp_path)
    # An absurd LR with no clipping blows the weights up: the gradient becomes non-finite.
    proc = run_dtrain(
        [
            "train",
            RECIPE,
            "optim.lr=1e12",
            "optim.clip_grad_norm=0",
            "train.max_nonfinite_steps=3",
            "train.max_steps=200",
            f"tracking.uri={uri}",
            "tracking.experiment=fails",
            f"output_dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    assert "non-finite for 3 consecutive steps" in proc.stderr.strip().splitlines()[-1]
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fails").experiment_id])
    assert run.info.status == "FAILED"
    assert not (tmp_path / "out" / "summary.json").exists()


def test_sigterm_during_the_last_flush_does_not_lose_it(tmp_path):
    """torchrun SIGTERMs the survivors of a dead rank just as rank 0, failed in a collective,
    flushes its last metrics: the flush and the final status still land, then the signal."""
    from dtrain.tracking import MlflowTracker

    uri = mlflow_store(tmp_path)
    tracker = MlflowTracker(uri, "sigterm", "r", params={}, tags={})
    real = tracker.client.log_batch

    def slow_log_batch(run_id, metrics=(), **kw):
        if metrics:  # the final flush: the launcher's SIGTERM arrives in the middle of it
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        return real(run_id, metrics=metrics, **kw)

    def interrupt(signum, frame):  # what the CLI installs
        raise KeyboardInterrupt

    tracker.client.log_batch = slow_log_batch
    tracker.log_metrics({"train/loss": 1.5}, step=20)
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):  # delivered, after the flush
            tracker.finish("FAILED")
    finally:
        signal.signal(signal.SIGTERM, previous)
    client = mlflow.MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")] == [20]
    assert client.get_run(tracker.run_id).info.status == "FAILED"


def test_a_stop_signal_while_the_run_is_being_opened_ends_it_killed(tmp_path, monkeypatch):
    """SIGTERM between creating the run and logging its params left it RUNNING for good (the
    run was not yet the job's, so nothing finished it). A real signal, at that point."""
    from dtrain import tracking
    from dtrain.runtime import preemption
    from dtrain.runtime.preemption import SignalInterrupt

    uri = mlflow_store(tmp_path)
    real = mlflow.MlflowClient.log_batch

    def log_batch(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises in this thread, here
        time.sleep(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", log_batch)
    # A job's state before its loop (earlier tests in this process may have ended a run in it).
    monkeypatch.setattr(preemption, "_holding", False)
    monkeypatch.setattr(preemption, "_in_loop", False)
    previous = signal.getsignal(signal.SIGTERM)
    preemption.install()
    try:
        with pytest.raises(SignalInterrupt):
            tracking.MlflowTracker(uri, "opening", "r", {"a": 1}, {"dtrain.world_size": 1})
    finally:
        signal.signal(signal.SIGTERM, previous)
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("opening").experiment_id])
    assert run.info.status == "KILLED"
