"""Where this process sits in the job: rank, world size and rendezvous address.

Given on the command line (`--rank`, `--world-size`, `--dist-url`, upstream style) or by
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). When both are
present they must agree: a mismatch is a one-line UserError before any process group exists.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from openchatkit.distributed.layout import check_layout
from openchatkit.errors import UserError

DEFAULT_DIST_URL = "tcp://127.0.0.1:29500"


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
