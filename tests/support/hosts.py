"""Hosts for tests: network namespaces, each with its own address, name and loopback, joined
by a bridge, so that a multi-node run crosses real network stacks instead of one loopback.

    with Hosts(3) as hosts:
        a, b, c = hosts
        proc = a.popen(["torchrun", ...])   # a process on host a (its hostname is a.name)
        a.cut()                              # its link down: no FIN, no RST, packets just stop
        a.restore(); a.freeze(); a.thaw(); a.kill()
        a.throttle(0.2)                      # its processes get a fifth of a core: a slow host

Each host resolves every host's name through its own /etc/hosts (`ip netns exec` mounts
/etc/netns/NS/hosts over it) and gets its hostname from a UTS namespace of its own, which
torchrun's c10d needs to recognise the host that serves the rendezvous. Needs root and
`ip netns`; `Hosts.available()` says why not where they are missing (tests skip on it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any, Sequence

CPU_CGROUP = Path("/sys/fs/cgroup/cpu")


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class Host:
    """One namespace: `name` (its hostname, what the others call it), `addr` (its address on the
    bridge), `ns` (the namespace) and `link` (its veth end on the bridge's side, which `cut`
    takes down)."""

    def __init__(self, ns: str, name: str, addr: str, link: str) -> None:
        self.ns, self.name, self.addr, self.link = ns, name, addr, link
        self.procs: list[subprocess.Popen[str]] = []
        self.cgroup: Path | None = None

    def command(self, args: Sequence[str]) -> list[str]:
        """`args` run on this host: its network namespace and a UTS namespace named after it."""
        return [
            "ip", "netns", "exec", self.ns,
            "unshare", "--uts", "sh", "-c", f'hostname "{self.name}" && exec "$@"', "sh", *args,
        ]  # fmt: skip

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(self.command(args), text=True, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(args), text=True, capture_output=True, **kwargs)

    def pids(self) -> list[int]:
        """Every process in this host's namespace."""
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def _signal(self, sig: signal.Signals) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def cut(self) -> None:
        """The host's link down: its packets stop, nothing tells the peers (no FIN, no RST)."""
        _ip("link", "set", self.link, "down")

    def restore(self) -> None:
        _ip("link", "set", self.link, "up")

    def freeze(self) -> None:
        """SIGSTOP to every process of the host: its sockets stay open and silent."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """The whole host gone at once (SIGKILL to every process on it)."""
        self._signal(signal.SIGKILL)

    def throttle(self, share: float) -> None:
        """Its processes (and those they start) get `share` of one core: the CFS quota of a CPU
        cgroup of their own, so they run in bursts and wait in between, as on a host with a
        noisy neighbour. Needs a writable cgroup v1 `cpu` hierarchy (`Hosts.throttling()`)."""
        group = CPU_CGROUP / f"dtrain-{self.ns}"
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text(str(int(share * 100000)))
        for pid in self.pids():
            with contextlib.suppress(OSError):  # gone meanwhile
                (group / "cgroup.procs").write_text(str(pid))
        self.cgroup = group

    def unthrottle(self) -> None:
        if self.cgroup is None:
            return
        for pid in (self.cgroup / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (CPU_CGROUP / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            self.cgroup.rmdir()
        self.cgroup = None

    def listening(self) -> list[tuple[str, int]]:
        """(address, port) of every TCP socket listening on this host."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns, "ss", "-ltnH"], capture_output=True, text=True, check=True
        ).stdout
        found = []
        for line in out.splitlines():
            local = line.split()[3]
            addr, _, port = local.rpartition(":")
            found.append((addr.strip("[]"), int(port)))
        return found

    def reaches(self, addr: str, port: int, timeout: float = 1.0) -> bool:
        """Whether a TCP connection from this host to addr:port is accepted."""
        probe = (
            "import socket,sys\n"
            "try:\n"
            f"    socket.create_connection(({addr!r}, {port}), timeout={timeout}).close()\n"
            "except OSError:\n"
            "    sys.exit(1)\n"
        )
        return self.run([shutil.which("python3") or "python3", "-c", probe]).returncode == 0


class Hosts:
    """`n` hosts on a bridge of their own (10.X.0.0/24), torn down on exit with their processes."""

    def __init__(self, n: int, prefix: str = "h") -> None:
        tag = uuid.uuid4().hex[:6]
        self.bridge = f"dtb{tag}"
        subnet = 10 + int(tag[:2], 16) % 200
        self.hosts = [
            Host(f"dt{tag}{i}", f"{prefix}{i}-{tag}", f"10.{subnet}.0.{i + 1}", f"dtv{tag}{i}") for i in range(n)
        ]

    @staticmethod
    def available() -> str:
        """'' where hosts can be made here, else why not."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        if not shutil.which("ip") or not shutil.which("unshare"):
            return "`ip` (iproute2) and `unshare` are needed for network namespaces"
        probe = f"dtprobe{uuid.uuid4().hex[:6]}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode:
            return f"network namespaces are not permitted here: {made.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return ""

    @staticmethod
    def throttling() -> str:
        """'' where `Host.throttle` works here, else why not."""
        if not (CPU_CGROUP / "cpu.cfs_quota_us").exists() or not os.access(CPU_CGROUP, os.W_OK):
            return f"no writable cgroup v1 cpu hierarchy at {CPU_CGROUP} (a host's CPU cannot be throttled)"
        return ""

    def __enter__(self) -> list[Host]:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        names = "".join(f"{h.addr} {h.name}\n" for h in self.hosts)
        for h in self.hosts:
            _ip("netns", "add", h.ns)
            etc = Path("/etc/netns") / h.ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{names}")
            _ip("link", "add", h.link, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
            _ip("link", "set", h.link, "master", self.bridge)
            _ip("link", "set", h.link, "up")
            _ip("addr", "add", f"{h.addr}/24", "dev", "eth0", ns=h.ns)
            _ip("link", "set", "eth0", "up", ns=h.ns)
            _ip("link", "set", "lo", "up", ns=h.ns)
        return self.hosts

    def __exit__(self, *exc: object) -> None:
        for h in self.hosts:
            h.thaw()
            h.unthrottle()
            h.kill()
            for proc in h.procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            subprocess.run(["ip", "link", "del", h.link], capture_output=True)
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / h.ns, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
