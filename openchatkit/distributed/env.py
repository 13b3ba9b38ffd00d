"""Where this process sits in the job: rank, world size and rendezvous address.

Given on the command line (`--rank`, `--world-size`, `--dist-url`, upstream style) or by
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). When both are
present they must agree: a mismatch is a one-line UserError before any process group exists.

Where the rendezvous store listens (`open_store`): torch's TCPStore binds every interface
(`::` / `0.0.0.0`) whatever host it is given, and PyTorch's security notes say whoever reaches
it can run code as the user. So rank 0 binds the listening socket itself and hands it to torch
(`master_listen_fd`): on 127.0.0.1 when the rendezvous host is a loopback address (every rank on
this node), else on the address of `--net-interface` (or, without it, the address the
rendezvous host names on this machine). gloo and NCCL are pinned to the same interface
(`pin_socket_interfaces`): `lo` for a loopback rendezvous.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from openchatkit.distributed.layout import check_layout
from openchatkit.errors import UserError

DEFAULT_DIST_URL = "tcp://127.0.0.1:29500"
TOKEN_ENV = "OPENCHATKIT_JOB_TOKEN"  # the per-job token; launch.py sets it on one node
TOKEN_KEY = "openchatkit/job_token"  # where rank 0 publishes a token it drew (fallback)
SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's IPv4 address


@dataclass(frozen=True)
class Rendezvous:
    """How this process joins the job."""

    rank: int
    world_size: int
    local_rank: int | None  # LOCAL_RANK; None when a multi-process job does not say
    init_method: str  # "tcp://host:port"

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the rendezvous TCP store."""
        return _parse_tcp(self.init_method)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def _parse_tcp(url: str) -> tuple[str, int]:
    if not url.startswith("tcp://"):
        raise UserError(f"--dist-url must look like tcp://HOST:PORT, got {url!r}")
    host, sep, port = url[len("tcp://") :].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"--dist-url must look like tcp://HOST:PORT, got {url!r}")
    return host, int(port)


def resolve_rendezvous(
    rank: int | None,
    world_size: int | None,
    dist_url: str | None,
    pipeline_size: int,
    data_size: int,
    env: Mapping[str, str] | None = None,
) -> Rendezvous:
    """Merge the flags with torchrun's environment; raise UserError on any contradiction,
    including a world size other than pipeline size x data size (`check_layout`)."""
    expected_world_size = pipeline_size * data_size
    env = os.environ if env is None else env
    env_rank = _env_int(env, "RANK")
    env_world = _env_int(env, "WORLD_SIZE")
    env_local = _env_int(env, "LOCAL_RANK")
    env_addr, env_port = env.get("MASTER_ADDR"), _env_int(env, "MASTER_PORT")

    if rank is not None and env_rank is not None and rank != env_rank:
        raise UserError(f"--rank {rank} contradicts the environment's RANK={env_rank}")
    if world_size is not None and env_world is not None and world_size != env_world:
        raise UserError(
            f"--world-size {world_size} contradicts the environment's WORLD_SIZE={env_world}"
        )
    rank = rank if rank is not None else env_rank
    world_size = world_size if world_size is not None else env_world
    if world_size is None:
        if expected_world_size != 1:
            raise UserError(
                f"--world-size is not given and WORLD_SIZE is not set, but --pipeline-group-size x "
                f"--data-group-size = {expected_world_size}; start one process per rank with "
                "training/launch.py or torchrun, or pass --rank/--world-size/--dist-url"
            )
        world_size = 1
    check_layout(pipeline_size, data_size, world_size)
    if rank is None:
        if world_size != 1:
            raise UserError("--rank is not given and RANK is not set")
        rank = 0
    if not 0 <= rank < world_size:
        raise UserError(f"--rank must be in [0, {world_size}), got {rank}")

    if dist_url is not None:
        host, port = _parse_tcp(dist_url)
        if env_addr is not None and env_addr != host:
            raise UserError(f"--dist-url host {host} contradicts MASTER_ADDR={env_addr}")
        if env_port is not None and env_port != port:
            raise UserError(f"--dist-url port {port} contradicts MASTER_PORT={env_port}")
        init_method = dist_url
    elif env_addr is not None and env_port is not None:
        init_method = f"tcp://{env_addr}:{env_port}"
    else:
        init_method = DEFAULT_DIST_URL
    local_rank = env_local if env_local is not None else (0 if world_size == 1 else None)
    return Rendezvous(rank, world_size, local_rank, init_method)


def cuda_device_index(
    cuda_id: int | None, local_rank: int | None, rank: int, world_size: int, device_count: int
) -> int:
    """The GPU of this process: --cuda-id, else LOCAL_RANK; without either, the global rank
    only when the whole job fits on this node (one node), else a UserError (on node 1 the
    global rank would name a GPU that does not exist, or the wrong one)."""
    index = cuda_id if cuda_id is not None else local_rank
    if index is None:
        if world_size > device_count:
            raise UserError(
                f"LOCAL_RANK is not set and --cuda-id is not given, and the job's {world_size} "
                f"ranks do not fit this node's {device_count} GPUs; pass --cuda-id or start "
                "the ranks with training/launch.py or torchrun"
            )
        index = rank
    if not 0 <= index < device_count:
        raise UserError(f"--cuda-id {index}, but only {device_count} GPUs are visible")
    return index


def is_loopback(host: str) -> bool:
    """True when `host` is a loopback address or `localhost`, which name this machine wherever
    they are resolved: every rank is then on this node. (A host name that resolves to 127.0.1.1
    here, as Debian's /etc/hosts has it, may name a LAN address on the other nodes: not this.)"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def interface_address(name: str) -> str:
    """The IPv4 address of the network interface `name` (Linux), for `--net-interface`."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError as err:
            raise UserError(
                f"--net-interface {name}: no such interface with an IPv4 address on this "
                f"machine ({err.strerror})"
            ) from None
    return socket.inet_ntoa(packed[20:24])


def pin_socket_interfaces(
    rdv: Rendezvous, net_interface: str | None, env: dict[str, str] | None = None
) -> None:
    """Have gloo and NCCL listen on `--net-interface`, or on `lo` when the rendezvous is on
    loopback (gloo otherwise binds the address the host name resolves to, often the LAN's).
    A GLOO_/NCCL_SOCKET_IFNAME the user set is kept."""
    env = os.environ if env is None else env
    name = net_interface
    if name is None and is_loopback(rdv.address[0]) and "lo" in _interfaces():
        name = "lo"
    if name is not None:
        env.setdefault("GLOO_SOCKET_IFNAME", name)
        env.setdefault("NCCL_SOCKET_IFNAME", name)


def _interfaces() -> set[str]:
    try:
        return {n for _, n in socket.if_nameindex()}
    except OSError:  # pragma: no cover - no interface list (not Linux)
        return set()


def listen_address(rdv: Rendezvous, net_interface: str | None) -> str | None:
    """The address rank 0's store listens on (see the module docstring); None: every interface
    (the host name resolves to a loopback address here but may not elsewhere, and no
    --net-interface says which to use)."""
    host = rdv.address[0].strip("[]")
    if is_loopback(host):
        return "127.0.0.1" if host == "localhost" else host  # clients try IPv4 for localhost
    if net_interface is not None:
        return interface_address(net_interface)
    try:
        address = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0]
    except OSError as err:
        raise UserError(f"rendezvous host {host} does not resolve ({err})") from None
    return None if ipaddress.ip_address(address).is_loopback else address


def _listen_socket(address: str, port: int, net_interface: str | None) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Like torch's own listener: a port in TIME_WAIT from the last run may be reused.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise UserError(
                f"rendezvous port {port} is already in use on {address}: another job? pick "
                "another MASTER_PORT / --dist-url port"
            ) from None
        if err.errno == errno.EADDRNOTAVAIL and net_interface is None:
            raise UserError(
                f"the rendezvous address {address} is not an address of this machine (rank 0 "
                "hosts the store): set MASTER_ADDR / --dist-url to it, or give --net-interface"
            ) from None
        raise UserError(f"cannot listen for the rendezvous on {address}:{port}: {err}") from None
    return sock


def open_store(
    rdv: Rendezvous,
    net_interface: str | None,
    timeout: datetime.timedelta,
    agent_store: bool = False,
):
    """The rendezvous TCPStore for `init_process_group(store=...)`: rank 0 hosts it on the
    address `listen_address` picks, the others (and every rank when torchrun's agent hosts it,
    `agent_store`) connect to the rendezvous host."""
    import torch.distributed as dist

    host, port = rdv.address
    if rdv.rank != 0 or agent_store:
        return dist.TCPStore(host, port, rdv.world_size, is_master=False, timeout=timeout)
    address = listen_address(rdv, net_interface)
    if address is None:
        from loguru import logger

        logger.warning(
            f"the rendezvous store listens on every interface: {host} resolves to a loopback "
            "address here; give --net-interface to listen on one (README: what to firewall)"
        )
        return dist.TCPStore(host, port, rdv.world_size, is_master=True, timeout=timeout)
    sock = _listen_socket(address, port, net_interface)
    # The store owns the descriptor from here (it closes it when it goes).
    return dist.TCPStore(
        host, port, rdv.world_size, is_master=True, timeout=timeout, master_listen_fd=sock.detach()
    )


def job_token(store, rank: int, attempt: str = "0", env: Mapping[str, str] | None = None) -> str:
    """The per-job random token every key the kit writes carries (the watchdog's keys), so a
    second job on the same store cannot collide with this one and a well-known key cannot be
    written blind. From OPENCHATKIT_JOB_TOKEN (launch.py draws one per single-node job; set the
    same value on every node of a multi-node job), else torchrun's run id when it is not
    "none" (`--standalone` draws one), else drawn by rank 0 and published in the store. The
    store can list its keys, so this is no defence against someone who can reach the store:
    loopback binding and a firewall are (README, "Multi-node: what to firewall")."""
    env = os.environ if env is None else env
    token = env.get(TOKEN_ENV) or ""
    if token:
        if len(token) < 16 or not token.replace("-", "").replace("_", "").isalnum():
            raise UserError(f"{TOKEN_ENV} must be 16 or more letters, digits, '-' or '_'")
        return token
    run_id = env.get("TORCHELASTIC_RUN_ID", "none")
    if run_id not in ("", "none"):
        return run_id
    key = f"{TOKEN_KEY}/{attempt}"
    if rank == 0:
        token = secrets.token_hex(16)
        store.set(key, token)
        return token
    return store.get(key).decode()
