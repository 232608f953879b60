"""Where a job listens. torch's `TCPStore`, left to itself, listens on every interface of the
host that serves it: torchrun's rendezvous store and rank 0's process-group store both, and
whoever reaches the port can read and write keys the agent unpickles (code execution as the
training user). dtrain hands each store a socket bound to the one address the job needs: the
address the endpoint or `MASTER_ADDR` names, as this host resolves it (`127.0.0.1` when every
rank shares one host). Gloo's own connections follow `GLOO_SOCKET_IFNAME` (loopback on one host).

`dtrain` is also a torchrun rendezvous backend (`--rdzv-backend dtrain`, registered through the
`torchrun.handlers` entry point): torch's c10d backend over such a store."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
from typing import Any

from torch._C._distributed_c10d import TCPStore as TCPStore  # torch.distributed.TCPStore, typed

DEFAULT_PORT = 29400  # torchrun's c10d default
log = logging.getLogger("dtrain")


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on the address `host` resolves to here (port 0: a free one)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    s = socket.socket(family, kind, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted attempt rebinds at once
    s.bind(address)
    s.listen(socket.SOMAXCONN)
    return s


def store(
    host: str, port: int, is_server: bool, timeout: datetime.timedelta, across_hosts: bool = False, **kwargs: Any
) -> TCPStore:
    """A `TCPStore` at `host:port`; the server listens on `host`'s address alone. `across_hosts`:
    other hosts may need to reach it, so a name this host resolves to loopback (Debian's
    `127.0.1.1 <hostname>`; torch's store would have listened everywhere) is said in a warning:
    agents on this host still join, those on others time out naming the endpoint."""
    if not is_server:
        return TCPStore(host, port, is_master=False, timeout=timeout, **kwargs)
    sock = listening_socket(host, port)
    bound = sock.getsockname()[0]
    if across_hosts and ipaddress.ip_address(bound).is_loopback:
        log.warning(
            "%s resolves to %s on its own host: ranks on other hosts cannot reach it. Give MASTER_ADDR / "
            "--rdzv-endpoint the host's cluster address, or map the name to it in /etc/hosts",
            host,
            bound,
        )
    # The store owns the descriptor from here on (it closes it with the store).
    return TCPStore(
        host, sock.getsockname()[1], is_master=True, timeout=timeout, master_listen_fd=sock.detach(), **kwargs
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_local_only(world_size: int, local_world_size: int) -> bool:
    """Every rank on this host: nothing needs to be reachable from another."""
    return world_size == local_world_size


def _create_handler(params: Any) -> Any:
    """torchrun's c10d rendezvous (`DynamicRendezvousHandler` over `C10dRendezvousBackend`),
    its store listening on the endpoint's address alone."""
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
    from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname, parse_rendezvous_endpoint

    # A store lent by the agent to its workers would be torch's, listening everywhere: the
    # workers make their own (`store`, through dtrain's process group), as after pytorch#135712.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=DEFAULT_PORT)
    told = params.get_as_bool("is_host")
    timeout = datetime.timedelta(seconds=params.get_as_int("read_timeout", 60))
    # As torch's backend: the host whose name or address the endpoint is serves the store; if
    # another process of this host got there first, join it instead.
    for is_server in dict.fromkeys([_matches_machine_hostname(host) if told is None else told, False]):
        try:
            tcp = store(host, port, is_server, timeout, across_hosts=not _is_loopback(host), multi_tenant=True)
            break
        except (OSError, ValueError, RuntimeError, TimeoutError) as e:
            if not is_server or told is not None:
                raise RendezvousConnectionError(f"cannot reach the rendezvous store at {host}:{port}: {e}") from e

    class Backend(C10dRendezvousBackend):  # c10d's, under the name torchrun was asked for
        @property
        def name(self) -> str:
            return "dtrain"

    return create_handler(tcp, Backend(tcp, params.run_id), params)


def torchrun_handler() -> Any:
    """The `torchrun.handlers` entry point: torchrun calls it for the handler's factory."""
    return _create_handler
