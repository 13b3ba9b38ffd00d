"""Start one training process per rank on this node, and stop them all together.

Used by `training/launch.py` (and so by every shell launcher). Multi-node settings come from the
environment: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (the same names torchrun uses). Each
child gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, which
`dist_clm_train.py` reads when --rank/--world-size/--dist-url are not given. On one node each
child also gets OPENCHATKIT_JOB_TOKEN, one random token per job (unless the user set one), that
the kit's store keys carry (`openchatkit.distributed.env.job_token`); across nodes the user sets
the same value on every node, or rank 0 draws one.

When one child exits non-zero the launcher names it and stops the others (SIGTERM, then SIGKILL
after a grace period); Ctrl-C or SIGTERM to the launcher stops every child. Children run in
their own process group so their own children go too.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from openchatkit.distributed.env import TOKEN_ENV
from openchatkit.errors import UserError

GRACE_S = 10.0  # seconds between SIGTERM and SIGKILL
POLL_S = 0.2


@dataclass(frozen=True)
class NodePlan:
    nproc: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def rank(self, local_rank: int) -> int:
        return self.node_rank * self.nproc + local_rank


def count_gpus() -> int:
    """CUDA devices visible to this node: nvidia-smi (no torch import), else torch's count
    (containers often lack nvidia-smi but see the GPUs); 0 if none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return _torch_device_count()
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return _torch_device_count()
    n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    if visible:
        n = min(n, len([v for v in visible.split(",") if v.strip()]))
    return n


def _torch_device_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count()


def free_port() -> int:
    """A TCP port that is free on this machine right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def plan_node(
    nproc: int | None,
    device: str,
    env: Mapping[str, str] | None = None,
    gpus: int | None = None,
    check_gpus: bool = True,
) -> NodePlan:
    """Work out this node's processes; refuse clearly when there are too few GPUs."""
    env = os.environ if env is None else env
    if device == "cuda" and check_gpus:
        gpus = count_gpus() if gpus is None else gpus
        if nproc is None:
            nproc = gpus
        if gpus == 0:
            raise UserError(
                "no CUDA GPU is visible on this node; this recipe needs "
                f"{nproc or 'one or more'} (use the CPU demo, or --device cpu)"
            )
        if nproc > gpus:
            raise UserError(
                f"this recipe starts {nproc} processes per node, one per GPU, but only {gpus} "
                "GPUs are visible; run it on a machine with enough GPUs or across nodes "
                "(NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT)"
            )
    if nproc is None or nproc < 1:
        raise UserError("--nproc must be >= 1")
    nnodes = _env_int(env, "NNODES", 1)
    node_rank = _env_int(env, "NODE_RANK", 0)
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise UserError(f"NODE_RANK={node_rank} must be in [0, NNODES={nnodes})")
    if nnodes > 1 and not env.get("MASTER_ADDR"):
        # 127.0.0.1 would make every node wait for a rendezvous on itself until the timeout.
        raise UserError(
            f"NNODES={nnodes} but MASTER_ADDR is not set: set it to node 0's address (the "
            "same on every node), and MASTER_PORT to a free port there"
        )
    addr = env.get("MASTER_ADDR") or "127.0.0.1"
    # One node and no port given: any free port, so concurrent jobs on a machine do not clash.
    port = _env_int(env, "MASTER_PORT", 29500 if nnodes > 1 else free_port())
    return NodePlan(nproc, nnodes, node_rank, addr, port)


def child_env(
    plan: NodePlan, local_rank: int, base: Mapping[str, str], token: str | None = None
) -> dict[str, str]:
    """The environment of local rank `local_rank`: `base` plus the rank variables (and the job
    token when one is given)."""
    env = dict(base)
    if token is not None:
        env[TOKEN_ENV] = token
    env.update(
        RANK=str(plan.rank(local_rank)),
        WORLD_SIZE=str(plan.world_size),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(plan.nproc),
        MASTER_ADDR=plan.master_addr,
        MASTER_PORT=str(plan.master_port),
    )
    if "OMP_NUM_THREADS" not in base:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.nproc))
    return env


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """In a child between fork and exec: have the kernel send `sig` when the launcher dies,
    even by SIGKILL, so no rank trains on as an orphan. Linux only; elsewhere a no-op (the
    launcher's own signal handlers still stop the ranks on SIGINT/SIGTERM)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the launcher died before prctl took effect
        os.kill(os.getpid(), sig)


def _signal_all(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def stop_all(procs: list[subprocess.Popen], grace: float = GRACE_S) -> None:
    """SIGTERM every live child's process group, then SIGKILL what is left after `grace` s."""
    _signal_all(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(POLL_S)
    _signal_all(procs, signal.SIGKILL)
    for p in procs:
        p.wait()


def launch(command: Sequence[str], plan: NodePlan, env: Mapping[str, str] | None = None) -> int:
    """Run `command` once per local rank; return 0 if all succeed, else the first failure's code."""
    base = os.environ if env is None else env
    # One node: a fresh token for this job (the nodes of a multi-node job could not agree on one).
    token = None if base.get(TOKEN_ENV) or plan.nnodes > 1 else secrets.token_hex(16)
    procs: list[subprocess.Popen] = []
    interrupted = {"sig": None}

    def on_signal(signum, _frame):
        interrupted["sig"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for local in range(plan.nproc):
            procs.append(
                subprocess.Popen(
                    list(command),
                    env=child_env(plan, local, base, token),
                    start_new_session=True,
                    preexec_fn=functools.partial(die_with_parent, os.getpid()),
                )
            )
        while True:
            if interrupted["sig"] is not None:
                print("launch: interrupted; stopping every rank", file=sys.stderr, flush=True)
                stop_all(procs)
                return 130
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                local, code = failed[0]
                print(
                    f"launch: rank {plan.rank(local)} (pid {procs[local].pid}) exited with code "
                    f"{code}; stopping the other ranks",
                    file=sys.stderr,
                    flush=True,
                )
                stop_all(procs)
                return code if code > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(POLL_S)
    finally:
        if any(p.poll() is None for p in procs):
            stop_all(procs, grace=2.0)
        for s, h in old.items():
            signal.signal(s, h)
