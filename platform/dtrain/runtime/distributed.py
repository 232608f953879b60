"""The process group: start it from the launcher's environment (`dtrain.runtime.environments`
detects which launcher), pick the device, small collectives, and always tear it down.

`init` starts the group (NCCL on CUDA, gloo otherwise) plus a side gloo group for
host-side agreement (preemption, failed writes) and for naming stuck ranks after a timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import re
import socket
import sys
import time
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from dtrain.runtime import environments, rendezvous
from dtrain.runtime.environments import DistEnv as DistEnv  # re-exported
from dtrain.runtime.environments import LaunchError as LaunchError

log = logging.getLogger(__name__)


def read_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """This process's launcher environment (`os.environ` by default) as a DistEnv."""
    return environments.read_env(os.environ if env is None else env)


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def pick_backend(device_type: str, local_world: int, gpus: int) -> str:
    """NCCL on CUDA with a GPU per rank; gloo on CPU, and where ranks share a GPU (NCCL refuses
    two ranks on one device; gloo all-reduces and broadcasts CUDA tensors)."""
    return "nccl" if device_type == "cuda" and local_world <= gpus else "gloo"


def init(env: DistEnv, timeout_s: float = 1800) -> torch.device:
    """Start the process group for `env` (no-op for one process) and return this rank's device."""
    device = pick_device(env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.world_size == 1:
        return device
    if dist.is_initialized():  # made by the launcher (Ray Train): keep it, add the side groups
        if _monitor is None:
            _side_groups(timeout_s)
        return device
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    if (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and env.rank == 0
        and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
    ):
        # torchrun lends its agent's store to every attempt without clearing it, so a restarted
        # group can read the dead attempt's addresses and fail to connect (pytorch#135712).
        log.warning(
            "torchrun restarts need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment "
            "(dtrain's launchers and images set it); without it a restarted group may fail to connect"
        )
    backend = pick_backend(device.type, env.local_world_size, torch.cuda.device_count() if device.type == "cuda" else 0)
    if backend == "gloo" and device.type == "cuda" and env.rank == 0:
        log.warning(
            "%d ranks per node share %d GPU(s): NCCL refuses two ranks on one GPU, so the group is "
            "gloo (slow; for testing multi-rank CUDA code on one GPU)",
            env.local_world_size,
            torch.cuda.device_count(),
        )
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend,
        store=_group_store(env, timeout),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        device_id=device if backend == "nccl" else None,
    )
    _side_groups(timeout_s)
    return device


def _side_groups(timeout_s: float) -> None:
    """Two gloo groups beside the main one: `_side` for small CPU collectives (a lagged
    maximum, an agreement), `_monitor` for naming stuck ranks after a timeout. The monitor has
    a group of its own: a side collective left waiting on a dead rank would queue the
    monitored barrier behind it, and the stuck rank could not be named."""
    global _monitor, _side
    timeout = datetime.timedelta(seconds=timeout_s)
    _side = dist.new_group(backend="gloo", timeout=timeout)
    _monitor = dist.new_group(backend="gloo", timeout=timeout)


_monitor = None
_side = None
_store: Any = None  # the group's store (rank 0 serves it): who runs where


def _group_store(env: DistEnv, timeout: datetime.timedelta) -> rendezvous.TCPStore:
    """The process group's store, which rank 0 serves on one address: loopback when every rank
    is on this host (and gloo's connections with it), else the address `MASTER_ADDR` names.
    torch's `env://` would listen on every interface. A store torchrun's agent lends is joined."""
    host, local = env.master_addr, rendezvous.is_local_only(env.world_size, env.local_world_size)
    if local:
        host = "127.0.0.1"
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    serves = env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    global _store
    store = rendezvous.store(host, env.master_port, serves, timeout, across_hosts=not local, world_size=env.world_size)
    store.set(f"dtrain/host/{env.rank}", socket.gethostname())  # for naming a rank that stops answering
    _store = store
    return store


def is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("timed out" in text or "timeout" in text)


def first_error(error: str) -> str:
    """Collective: the first rank's non-empty error message, on every rank ("" if none).
    Where one rank may fail alone (a write, a load), the others learn it here instead of
    waiting for it at a barrier, and every rank reports the same words."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    if agree(not error):
        return ""
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=side_group())
    return str(next(e for e in errors if e))


def is_peer_gone(e: BaseException) -> bool:
    """A collective failed because another rank's process went away (it failed or died)."""
    text = str(e).lower()
    return isinstance(e, (RuntimeError, ConnectionError)) and any(
        s in text
        for s in (
            "connection closed by peer",
            "connection reset by peer",
            "broken pipe",
            "remote process exited",
            "communicator was aborted",
            "socket closed",
        )
    )


def first_to_report(line: str, wait_s: float = 2.0) -> bool:
    """Whether this rank should print its error `line`: rank 0 always does; another rank does
    unless rank 0 reports the same line within `wait_s` (or has already gone, having said its
    own). The job's store carries the lines, so no collective is needed."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"dtrain/error/{dist.get_rank()}", line)
        if dist.get_rank() == 0:
            return True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if store.check(["dtrain/error/0"]):
                return store.get("dtrain/error/0").decode() != line
            time.sleep(0.05)
        return True
    except Exception:  # the store lives in rank 0: gone means rank 0 ended and spoke for itself
        return dist.get_rank() == 0


def stuck_ranks(wait_s: float = 10.0) -> list[int] | None:
    """After a collective timed out: the ranks that do not reach a monitored barrier within
    `wait_s` (gloo's monitored_barrier names them). None when that cannot be found out."""
    if _monitor is None:
        return None
    try:
        dist.monitored_barrier(group=_monitor, timeout=datetime.timedelta(seconds=wait_s), wait_all_ranks=True)
        return []
    except RuntimeError as e:
        match = re.search(r"[Rr]anks? ([\d, ]+) failed to pass", str(e))
        return [int(r) for r in match.group(1).replace(" ", "").split(",") if r] if match else None


def named(ranks: list[int]) -> str:
    """`1 (host b), 3 (host c)`: ranks with the host each runs on, as they said when they joined
    (a rank that never said: the rank alone)."""

    def host(rank: int) -> str:
        key = f"dtrain/host/{rank}"
        try:
            return f" (host {_store.get(key).decode()})" if _store is not None and _store.check([key]) else ""
        except Exception:  # the store is rank 0's: gone with it
            return ""

    return ", ".join(f"{r}{host(r)}" for r in ranks)


def init_single_process_group(device: torch.device) -> None:
    """A 1-rank group on a free loopback port, for libraries that insist on one (DeepSpeed)."""
    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # DeepSpeed reads LOCAL_RANK itself
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )


def shutdown(clean: bool = True) -> None:
    """Tear the process group down. After a clean finish, ranks first wait for each other,
    and then for every rank to have torn its group down before any exits: a gloo rank whose
    peer's process closes its connections while it still holds them can abort (SIGABRT).
    After an error the peers may be gone, so no waiting is attempted."""
    global _monitor, _side, _store
    if dist.is_initialized():
        store = dist.distributed_c10d._get_default_store() if clean else None
        world = dist.get_world_size()
        if clean:
            dist.barrier()
        # Objects that hold the process group (a DDP reducer kept alive by a reference cycle)
        # are freed now, while the group is still registered: freed later, at interpreter exit,
        # the group's last reference can drop on one of gloo's own threads, which then destroys
        # itself while joinable (std::terminate: "terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()
        if store is not None and world > 1:
            exit_barrier(store, world)
    _monitor = _side = None
    _store = None


def exit_barrier(store: Any, world: int, key: str = "dtrain/exited", timeout_s: float = 30.0) -> None:
    """Wait (bounded) until all `world` ranks have passed this point, through the job's store
    rather than the process group (already destroyed)."""
    try:
        store.add(key, 1)
        deadline = time.monotonic() + timeout_s
        while store.add(key, 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)
    except Exception:  # nosec B110 # the store's host has exited: nobody is left to wait for
        pass


def sync_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (e.g. BatchNorm running statistics) on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for b in module.buffers():
            dist.broadcast(b, src=0)


# --------------------------------------------------------------------------- helpers


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor (an FSDP2 shard), checked without importing DTensor where none can exist."""
    tensor = sys.modules.get("torch.distributed.tensor")
    return tensor is not None and isinstance(t, tensor.DTensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """A parameter's tensor on this rank: its shard under FSDP2 (differentiable), else itself."""
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]


def shard_like(whole: torch.Tensor, like: Any) -> torch.Tensor:
    """This rank's part of `whole`, cut as FSDP2 cut the parameter `like` (a DTensor)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, like.device_mesh, like.placements).to_local()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def backend() -> str:
    return dist.get_backend() if dist.is_initialized() else "none"


@contextlib.contextmanager
def local_first() -> Iterator[None]:
    """Local rank 0 of each machine runs the block first, then the machine's other ranks: for
    work that fills a per-machine cache (a dataset converted to Arrow) and must not race."""
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not first:
        barrier()
    yield
    if first:
        barrier()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; identity for one process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t).div_(world_size())


def all_reduce_max(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


class LaggedMax:
    """The largest of a few integers over the ranks, asked at one step boundary and answered at
    a later one: `start(values)` launches the all-reduce on the side group without waiting,
    `read()` (at a later boundary, on every rank alike) waits for it, long done by then, and
    says. So no step waits on the slowest rank for a question that is almost always "no".
    One process: no lag."""

    def __init__(self) -> None:
        self._work: tuple[Any, torch.Tensor] | None = None
        self._local: list[int] | None = None

    def start(self, values: list[int]) -> None:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            self._local = values
            return
        t = torch.tensor(values, dtype=torch.int64)
        self._work = (dist.all_reduce(t, op=dist.ReduceOp.MAX, group=side_group(), async_op=True), t)

    def read(self) -> list[int] | None:
        """The answer to the last `start` (None: none asked since the last read)."""
        local, self._local = self._local, None
        if self._work is None:
            return local
        (work, t), self._work = self._work, None
        work.wait()
        return [int(v) for v in t.tolist()]

    def drain(self) -> None:
        """Every rank alike: complete what is in flight and forget its answer."""
        self.read()


class LaggedAny(LaggedMax):
    """Whether a flag is set on any rank (`LaggedMax` of one value)."""

    def start(self, flag: bool) -> None:  # type: ignore[override]
        super().start([int(flag)])

    def read(self) -> bool | None:  # type: ignore[override]
        """The answer to the last `start` (None: none asked since the last read)."""
        answer = super().read()
        return None if answer is None else bool(answer[0])


def side_group() -> Any:
    """The side gloo group (CPU tensors, never a GPU stream), or the default group where
    there is none (a gloo-only test group)."""
    return _side


def agree(ok: bool) -> bool:
    """Collective: True on every rank when `ok` is True on every rank. Used where one rank
    may fail alone (a write, a load) and the others must not wait for it at a barrier."""
    failed = torch.tensor([0 if ok else 1], dtype=torch.int32)
    return not bool(all_reduce_max(failed, group=side_group()).item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s Python object on every rank (e.g. the MLflow run id)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's Python object, in rank order (on the side group: no GPU synchronisation)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=side_group())
    return out


def hostname() -> str:
    return socket.gethostname()
