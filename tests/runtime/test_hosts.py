"""Runs across hosts (network namespaces with their own address and name, tests/support/hosts.py):
what a job leaves reachable from another host, and 2 hosts x 1 rank training to the parameters
of 1 host x 2 ranks over a rendezvous bound to the cluster's address."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from helpers import CNN, DDP_BASELINE, PY, TINY_CNN, env_for_cli, load_params, max_param_diff, mlflow_store
from hosts import Host, Hosts

pytestmark = pytest.mark.skipif(bool(Hosts.available()), reason=Hosts.available() or "hosts available")


def _until_training(proc: subprocess.Popen[str], marker: str = "step ") -> None:
    """Read the run's output until it trains (every store, group and connection made)."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(marker):
            return
    raise AssertionError(f"the run ended before training: {''.join(seen[-20:])}")


def _exposed(host: Host, other: Host) -> list[tuple[str, int]]:
    """The ports of `host`'s listening sockets that `other`, or `host` itself through its
    address on the network, can connect to."""
    ports = sorted({port for addr, port in host.listening()})
    return [(who.name, port) for port in ports for who in (other, host) if who.reaches(host.addr, port)]


# A process group made as torch's documentation shows (env://), under plain `torchrun --standalone`.
PLAIN = textwrap.dedent(
    """
    import time, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    dist.all_reduce(torch.ones(1))
    print("step 1", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.slow
def test_a_single_host_run_leaves_nothing_another_host_can_reach(tmp_path):
    """`dtrain train --nproc-per-node 2` on host a: no port its agent, stores or gloo opened
    accepts a connection from host c, or from a itself through its network address. The same
    probe finds torch's own stores open to host c under plain `torchrun --standalone`: the
    exposure dtrain's rendezvous and process-group stores close (dtrain.runtime.rendezvous)."""
    (tmp_path / "plain.py").write_text(PLAIN)
    env = env_for_cli()
    with Hosts(2) as (a, c):
        plain = a.popen(
            [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(tmp_path / "plain.py")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        _until_training(plain)
        assert _exposed(a, c), "torch's stores were expected to listen on every interface"
        a.kill()
        plain.wait(timeout=30)

        run = a.popen(
            [
                PY,
                "-m",
                "dtrain",
                "train",
                CNN,
                *TINY_CNN,
                "train.max_steps=100000",
                "tracking.log_every=1",
                f"output_dir={tmp_path / 'run'}",
                "--nproc-per-node",
                "2",
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
        _until_training(run)
        listening = a.listening()
        assert len(listening) >= 3 and {addr for addr, _ in listening} == {"127.0.0.1"}, listening
        assert _exposed(a, c) == []


def _two_host_job(
    hosts: list[Host], tmp_path, *overrides: str, restarts: int = 0, nnodes: str = "2", rdzv_conf: str = ""
) -> list[subprocess.Popen[str]]:
    """`torchrun --nnodes NNODES` of 1 rank on each host (dtrain's rendezvous on the first, gloo on
    the hosts' eth0), the CNN recipe with `overrides`, each host's output in `<host>.log`."""
    env = env_for_cli(GLOO_SOCKET_IFNAME="eth0")
    conf = [f"--rdzv-conf={rdzv_conf}"] if rdzv_conf else []
    torchrun = [PY, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc-per-node=1", "--rdzv-backend=dtrain",
                f"--rdzv-endpoint={hosts[0].name}:29400", f"--rdzv-id={tmp_path.name}", f"--max-restarts={restarts}",
                *conf]  # fmt: skip
    return [
        h.popen(
            [*torchrun, "-m", "dtrain", "train", CNN, *TINY_CNN, *overrides],
            stdout=(tmp_path / f"{h.name}.log").open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
        for h in hosts
    ]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_hosts_of_one_rank_train_to_one_host_of_two_ranks(tmp_path, tiny_runs, engine):
    """c10d rendezvous (dtrain's backend) over the hosts' addresses, gloo on their eth0: the same
    parameters as 2 ranks on one host; every socket of the job listens on the host's address
    alone, none on every interface."""
    overrides = [*DDP_BASELINE] if engine == "ddp" else ["engine=fsdp", "fsdp.offload=true", "ema.decay=0.9"]
    reference = tiny_runs(f"cnn-{engine}", *overrides, recipe=CNN, base=TINY_CNN)
    out = tmp_path / "run"
    with Hosts(2) as hosts:
        logs = [tmp_path / f"{h.name}.log" for h in hosts]
        procs = _two_host_job(hosts, tmp_path, *overrides, f"output_dir={out}")
        listened: dict[str, set[str]] = {h.name: set() for h in hosts}
        deadline = time.monotonic() + 300
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            for h in hosts:
                listened[h.name] |= {addr for addr, _ in h.listening()}
            time.sleep(0.2)
        assert [p.poll() for p in procs] == [0, 0], [log.read_text()[-3000:] for log in logs]
    # Every socket of the job, sampled while it ran, on its host's address: none on 0.0.0.0 / ::.
    assert listened == {h.name: {h.addr} for h in hosts}, listened
    assert max_param_diff(load_params(out / "model.pt"), load_params(reference / "model.pt"), buffers=True) <= 1e-6


def _wait_for(path, text: str, timeout: float = 120, after: str = "") -> None:
    """Until `text` is in the file at `path` (after the first `after`)."""
    deadline = time.monotonic() + timeout
    while text not in (path.read_text().split(after, 1)[-1] if after else path.read_text()):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}: {path.read_text()[-2000:]}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.skipif(bool(Hosts.throttling()), reason=Hosts.throttling() or "throttling available")
def test_a_slow_host_is_named_as_the_straggler(tmp_path):
    """Host b's processes get a fifth of a core from step 30 on (a CPU limit's quota): its rank
    hands in its gradients last, every time. Within three comparisons of 10 steps dtrain names
    rank 1 on host b, with `stragglers/ratio` (its demand for CPU time per step over host a's)
    above the threshold; before the throttle, nobody was named."""
    import mlflow

    uri = mlflow_store(tmp_path)
    with Hosts(2) as hosts:
        a, b = hosts
        procs = _two_host_job(
            hosts, tmp_path, "train.max_steps=100", "stragglers.every_steps=10", "tracking.enabled=true",
            f"tracking.uri={uri}", "tracking.log_every=10", f"output_dir={tmp_path / 'out'}",
        )  # fmt: skip
        log_a = tmp_path / f"{a.name}.log"
        _wait_for(log_a, "\nstep 30/")
        b.throttle(0.2)
        _wait_for(log_a, "straggler: ", timeout=90, after="\nstep 30/")
        b.unthrottle()
        for p in procs:
            p.wait(timeout=120)
    text = log_a.read_text()
    assert [p.returncode for p in procs] == [0, 0], text[-3000:]
    before, _, after = text.partition("\nstep 30/")
    assert "straggler: " not in before, before[-3000:]  # nothing slow: nobody named
    line = next(x for x in after.splitlines() if x.startswith("straggler: "))
    assert line.startswith(f"straggler: rank 1 (host {b.name}) wants "), line
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cnn_digits").experiment_id])
    ratios = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "stragglers/ratio")}
    print("stragglers/ratio by step:", {k: round(v, 2) for k, v in sorted(ratios.items())})
    named = json.loads((tmp_path / "out" / "summary.json").read_text())["stragglers"][0]
    assert named["rank"] == 1 and 30 < named["step"] <= 61 and named["ratio"] >= 2, named
    assert ratios[named["step"]] >= 2


@pytest.mark.slow
def test_a_rank_frozen_on_another_host_ends_the_job_naming_its_rank_and_host(tmp_path):
    """Host b's processes SIGSTOPped mid-run (its sockets open and silent): rank 0 on host a
    gives up after train.collective_timeout_s and says which rank and host stopped answering,
    within the stated bound (timeout 8 s + the 10 s it gives the monitored barrier + exit)."""
    with Hosts(2) as hosts:
        a, b = hosts
        procs = _two_host_job(hosts, tmp_path, "train.max_steps=100000", "tracking.log_every=1",
                              "train.collective_timeout_s=8", f"output_dir={tmp_path / 'out'}")  # fmt: skip
        log_a = tmp_path / f"{a.name}.log"
        _wait_for(log_a, "\nstep ")  # rank 0 (host a: the rendezvous orders hosts by name) trains
        b.freeze()
        frozen = time.monotonic()
        procs[0].wait(timeout=120)
        took = time.monotonic() - frozen
    lines = [line for line in log_a.read_text().splitlines() if line.startswith("dtrain: error:")]
    assert lines == [
        "dtrain: error: a collective waited longer than train.collective_timeout_s=8s: "
        f"rank(s) 1 (host {b.name}) never joined it (hung or dead)"
    ], log_a.read_text()[-3000:]
    print(f"host b frozen: host a's agent ended {took:.1f}s later")
    assert procs[0].returncode != 0 and took < 40, took


@pytest.mark.slow
def test_a_host_whose_link_is_cut_rejoins_and_the_job_resumes_in_the_same_mlflow_run(tmp_path):
    """Host b's link cut after step 10's checkpoint (no FIN, no RST): rank 0 on host a notices
    within train.collective_timeout_s; once the link is back, the agents restart the group, which
    resumes from step 10 and finishes in the same MLflow run, every step's metrics there."""
    import mlflow

    uri = mlflow_store(tmp_path)
    out = tmp_path / "out"
    with Hosts(2) as hosts:
        a, b = hosts
        procs = _two_host_job(
            hosts, tmp_path, "train.max_steps=40", "checkpoint.every_steps=10", "train.collective_timeout_s=8",
            "tracking.enabled=true", f"tracking.uri={uri}", "tracking.log_every=1", f"output_dir={out}",
            "task=faulty:SlowCNN", restarts=1,
        )  # fmt: skip
        log_a = tmp_path / f"{a.name}.log"
        _wait_for(log_a, "\nstep 12/")  # past step 10's checkpoint
        b.cut()
        cut = time.monotonic()
        _wait_for(log_a, "collective_timeout_s=8s", timeout=60)
        noticed = time.monotonic() - cut
        b.restore()
        for p in procs:
            p.wait(timeout=300)
    text = log_a.read_text()
    print(f"link cut: host a noticed in {noticed:.1f}s")
    assert [p.returncode for p in procs] == [0, 0], text[-3000:]
    assert noticed < 30 and "resumed at step 10" in text, text[-3000:]
    # The goodput account: 2 attempts, the wait for the lost host as downtime (at least the
    # collective timeout), the steps after the checkpoint as redone.
    (goodput,) = re.findall(r"^goodput .* over 2 attempts: .*$", text, re.M)
    downtime, redone = re.search(r"(\d+) steps redone [\d.]+s, downtime ([\d.]+)s", goodput).group(2, 1)
    assert float(downtime) >= 8 and int(redone) >= 2, goodput
    summary = json.loads((out / "summary.json").read_text())
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cnn_digits").experiment_id])
    assert run.info.run_id == summary["run_id"] and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(set(steps)) == list(range(1, 41)), steps


@pytest.mark.slow
def test_an_elastic_job_goes_on_alone_when_a_host_is_cut_and_takes_it_back_when_it_returns(tmp_path):
    """`--nnodes 1:2` under FSDP2: host b's link cut after step 10's checkpoint; host a goes on
    alone from step 10, the sharded state resharded onto 1 rank and the global batch kept (1 rank
    x 64 instead of 2 x 32), and when the link is back the agents grow the group to 2 again, which
    resumes (resharded again) where host a got to. One MLflow run, 80
    steps of 64 samples."""
    import mlflow

    uri = mlflow_store(tmp_path)
    out = tmp_path / "out"
    with Hosts(2) as hosts:
        a, b = hosts
        procs = _two_host_job(
            hosts, tmp_path, "train.max_steps=80", "checkpoint.every_steps=10", "train.collective_timeout_s=8",
            "tracking.enabled=true", f"tracking.uri={uri}", "tracking.log_every=1", f"output_dir={out}",
            "task=faulty:SlowCNN", "engine=fsdp", restarts=3, nnodes="1:2",
            # a lost agent is let go after 3 missed 2 s keep-alives; a round closes 2 s after its last join
            rdzv_conf="last_call_timeout=2,keep_alive_interval=2,keep_alive_max_attempt=3",
        )  # fmt: skip
        log_a = tmp_path / f"{a.name}.log"
        _wait_for(log_a, "\nstep 12/", after="fsdp x2")  # both hosts in the group
        b.cut()
        cut = time.monotonic()
        _wait_for(log_a, "resumed at step 10", timeout=90)
        alone = time.monotonic() - cut
        time.sleep(5)  # host a trains alone a while
        b.restore()
        for p in procs:
            p.wait(timeout=300)
    text = log_a.read_text()
    print(f"link cut: host a trained alone {alone:.1f}s later")
    assert [p.returncode for p in procs] == [0, 0], text[-3000:]
    # Host a may have begun alone (host b slower to join than the 2 s last call) and been
    # restarted when b joined: the attempts that count are the ones after the cut.
    starts = [line for line in text.splitlines() if line.startswith("dtrain: cnn_digits |")]
    alone_at = next(i for i, line in enumerate(starts) if "resumed at step 10 " in line)
    assert "fsdp x1" in starts[alone_at] and "1 rank x 64 x 1 accum" in starts[alone_at], starts
    assert len(starts) == alone_at + 2 and "fsdp x2" in starts[-1] and "resumed at step" in starts[-1], starts
    assert alone < 60, alone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 80 and summary["samples_seen"] == 80 * 64
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cnn_digits").experiment_id])
    assert run.info.run_id == summary["run_id"] and run.info.status == "FINISHED"


@pytest.mark.slow
def test_a_ray_job_across_hosts_resumes_in_the_same_run_when_the_worker_host_is_cut(tmp_path):
    """A Ray cluster of two hosts (its head on host a, a node on host b, 1 CPU each: one worker
    per host, token authentication on), `dtrain train --ray-workers 2 --ray-address` from host a.
    Host b's link cut after step 10's checkpoint: Ray's health check notices (1 s heartbeats, 5
    missed) and Ray Train restarts the group, which waits for 2 workers; host b back (its Ray node,
    which the cluster had marked dead, started again as a node manager would), the group
    resumes at step 10 and finishes the 40 steps in the same MLflow run."""
    pytest.importorskip("ray.train.torch", reason='Ray Train is not installed (pip install -e ".[ray]")')
    import mlflow

    uri, out = mlflow_store(tmp_path), tmp_path / "out"
    ray, short = str(Path(PY).parent / "ray"), Path(tempfile.mkdtemp(prefix="r"))  # Ray's sockets: short paths
    env = env_for_cli(GLOO_SOCKET_IFNAME="eth0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
                      RAY_AUTH_TOKEN=secrets.token_urlsafe(32), RAY_health_check_period_ms="1000",
                      RAY_health_check_timeout_ms="1000", RAY_health_check_failure_threshold="5")  # fmt: skip
    with Hosts(2) as hosts:
        a, b = hosts
        head = f"{a.addr}:6379"

        def node(host: Host, *args: str) -> subprocess.Popen[str]:
            log = (tmp_path / f"ray-{host.name}.log").open("a")
            cmd = [ray, "start", "--block", f"--node-ip-address={host.addr}", "--num-cpus=1", *args,
                   f"--temp-dir={short / host.name}"]  # fmt: skip
            return host.popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

        node(a, "--head", "--port=6379", "--include-dashboard=false", "--disable-usage-stats")
        time.sleep(3)  # the head's services up before the node dials it
        first = node(b, f"--address={head}")
        job_log = tmp_path / "job.log"
        job = a.popen(
            [PY, "-m", "dtrain", "train", CNN, *TINY_CNN, "--ray-workers", "2", "--ray-address", head,
             "--ray-max-failures", "1", "task=faulty:SlowCNN", "train.max_steps=40", "checkpoint.every_steps=10",
             "tracking.enabled=true", f"tracking.uri={uri}", "tracking.log_every=1", f"output_dir={out}"],
            env=env, cwd=tmp_path, stdout=job_log.open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        _wait_for(job_log, "step 12/", timeout=180)
        b.cut()
        cut = time.monotonic()
        _wait_for(job_log, "health check failed", timeout=60)
        noticed = time.monotonic() - cut
        b.restore()
        first.wait(timeout=60)  # told it was marked dead, its node manager exits
        node(b, f"--address={head}")
        assert job.wait(timeout=300) == 0, job_log.read_text()[-3000:]
        shutil.rmtree(short, ignore_errors=True)
    text = job_log.read_text()
    print(f"link cut: Ray noticed {noticed:.1f}s later")
    assert noticed < 30, noticed
    placed = re.findall(r"\(ip=([\d.]+), pid=\d+\) world_rank=(\d)", text)
    assert {ip for ip, _ in placed[:2]} == {a.addr, b.addr}, placed  # one worker on each host
    assert "ray: a restarted attempt; continuing from step_00000010" in text, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 40 and summary["samples_seen"] == 40 * 64
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cnn_digits").experiment_id])
    assert run.info.run_id == summary["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["dtrain.launcher"] == "ray" and run.data.tags["dtrain.resumed"] == "true"
