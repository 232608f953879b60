"""Runs across hosts (network namespaces with their own address and name, tests/support/hosts.py):
what a job leaves reachable from another host, and 2 hosts x 1 rank training to the parameters
of 1 host x 2 ranks over a rendezvous bound to the cluster's address."""

from __future__ import annotations

import subprocess
import textwrap
import time

import pytest
from helpers import CNN, DDP_BASELINE, PY, TINY_CNN, env_for_cli, load_params, max_param_diff
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


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_hosts_of_one_rank_train_to_one_host_of_two_ranks(tmp_path, tiny_runs, engine):
    """c10d rendezvous (dtrain's backend) over the hosts' addresses, gloo on their eth0: the same
    parameters as 2 ranks on one host; every socket of the job listens on the host's address
    alone, none on every interface."""
    overrides = [*DDP_BASELINE] if engine == "ddp" else ["engine=fsdp", "fsdp.offload=true", "ema.decay=0.9"]
    reference = tiny_runs(f"cnn-{engine}", *overrides, recipe=CNN, base=TINY_CNN)
    env = env_for_cli(GLOO_SOCKET_IFNAME="eth0")
    out = tmp_path / "run"
    with Hosts(2) as hosts:
        logs = [tmp_path / f"{h.name}.log" for h in hosts]
        procs = [
            h.popen(
                [
                    PY,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes=2",
                    "--nproc-per-node=1",
                    "--rdzv-backend=dtrain",
                    f"--rdzv-endpoint={hosts[0].name}:29400",
                    "--rdzv-id=parity",
                    "-m",
                    "dtrain",
                    "train",
                    CNN,
                    *TINY_CNN,
                    *overrides,
                    f"output_dir={out}",
                ],  # fmt: skip
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,
            )
            for h, log in zip(hosts, logs)
        ]
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
