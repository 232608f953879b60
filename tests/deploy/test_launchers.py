"""Every launcher path, for real on this machine: two torchrun "nodes" (loopback, and two
network namespaces where `ip netns` works), `accelerate launch`, and the `deepspeed` launcher."""

import json
import os
import shutil
import subprocess
import uuid

import pytest
from helpers import PY, ROOT, check, env_for_cli, free_port, load_params, max_param_diff, run_dtrain

CNN = str(ROOT / "recipes" / "cnn_digits.yaml")
FAST = [
    "tracking.enabled=false",
    "train.max_steps=12",
    "data.augment=false",
    "checkpoint.every_steps=0",
    "train.eval_every_steps=0",
    "model.sync_bn=true",
]


def agent_cmd(endpoint: str, out, prefix: list[str] = (), extra: list[str] = (), rdzv_id: str = "dt") -> list[str]:
    return [
        *prefix,
        PY,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        f"--rdzv_id={rdzv_id}",
        "--max_restarts=0",
        *extra,
        "-m",
        "dtrain",
        "train",
        CNN,
        *FAST,
        f"output_dir={out}",
    ]


def run_two_agents(cmds: list[list[str]], cwd, env=None) -> None:
    procs = [
        subprocess.Popen(
            c, cwd=cwd, env=env or env_for_cli(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for c in cmds
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def single_node(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    check(run_dtrain(["train", CNN, *FAST, f"output_dir={root / 'out'}"], cwd=root, nproc=2))
    return load_params(root / "out" / "model.pt")


@pytest.mark.slow
def test_two_nodes_on_loopback_equal_one_node(single_node, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    run_two_agents([agent_cmd(endpoint, tmp_path / "out")] * 2, tmp_path)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["world_size"] == 2
    assert max_param_diff(single_node, load_params(tmp_path / "out" / "model.pt"), buffers=True) < 1e-6


def _netns_unavailable() -> str:
    """Why network namespaces cannot be made here ("" when they can)."""
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    if not shutil.which("ip"):
        return "the `ip` command (iproute2) is not installed"
    name = f"dtprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return "" if made.returncode == 0 else f"`ip netns add` failed: {made.stderr.strip()[:200]}"


NETNS_UNAVAILABLE = _netns_unavailable()


@pytest.mark.skipif(bool(NETNS_UNAVAILABLE), reason=NETNS_UNAVAILABLE or "available")
@pytest.mark.slow
def test_two_nodes_in_network_namespaces(single_node, tmp_path):
    """Two 'hosts' joined by a veth pair: MASTER_ADDR is 10.231.0.1, not localhost."""
    tag = uuid.uuid4().hex[:6]
    a, b = f"dta{tag}", f"dtb{tag}"
    sh = lambda *c: subprocess.run(c, check=True, capture_output=True)  # noqa: E731
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        for ns, dev, ip in ((a, f"va{tag}", "10.231.0.1/24"), (b, f"vb{tag}", "10.231.0.2/24")):
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "name", "dt0")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", ip, "dev", "dt0")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "dt0", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        # gloo must talk over the veth (dt0), not whatever the host name resolves to.
        env = env_for_cli(GLOO_SOCKET_IFNAME="dt0")
        endpoint = f"10.231.0.1:{free_port()}"
        # Both "hosts" share this machine's host name, so tell torchrun which agent hosts the
        # rendezvous store and which address each advertises to the workers.
        run_two_agents(
            [
                agent_cmd(
                    endpoint,
                    tmp_path / "out",
                    ["ip", "netns", "exec", ns],
                    [f"--rdzv_conf=is_host={int(ns == a)}", f"--local_addr={ip}"],
                    tag,
                )
                for ns, ip in ((a, "10.231.0.1"), (b, "10.231.0.2"))
            ],
            tmp_path,
            env,
        )
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert max_param_diff(single_node, load_params(tmp_path / "out" / "model.pt"), buffers=True) < 1e-6


@pytest.mark.slow
def test_accelerate_launch(tmp_path):
    cmd = [
        "accelerate",
        "launch",
        "--config_file",
        str(ROOT / "launchers" / "accelerate" / "multi_process.yaml"),
        "--main_process_port",
        str(free_port()),
        "-m",
        "dtrain",
        "train",
        CNN,
        *FAST,
        f"output_dir={tmp_path / 'out'}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env_for_cli(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 12
    yaml_cfg = (tmp_path / "out" / "config.yaml").read_text()
    assert "engine: ddp" in yaml_cfg


@pytest.mark.slow
def test_deepspeed_launcher(tmp_path):
    cmd = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "dtrain",
        "train",
        CNN,
        *FAST,
        "engine=deepspeed",
        "deepspeed.zero_stage=1",
        f"output_dir={tmp_path / 'out'}",
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env_for_cli(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["engine"] == "deepspeed"
