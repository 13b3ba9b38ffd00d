"""The rendezvous listens where the run needs it and nowhere else.

torch's TCPStore binds every interface whatever host it is given, so a 2-rank CPU run used to
leave an unauthenticated store open to the network. Here a real 2-rank run through
`training/launch.py` is frozen mid-training (one rank SIGSTOPped) and every LISTEN socket its
processes own is read from /proc/net/tcp{,6}: all must be loopback. Unit tests cover how the
listening address is chosen, the per-job token in the watchdog's keys, and the launcher's token.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openchatkit.distributed.env import (
    TOKEN_ENV,
    Rendezvous,
    is_loopback,
    job_token,
    listen_address,
    open_store,
    pin_socket_interfaces,
)
from openchatkit.distributed.launcher import NodePlan, child_env
from openchatkit.errors import UserError

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[len("socket:[") : -1])
    return out


def _decode(hex_addr: str) -> str:
    """/proc/net/tcp's local address (little-endian 32-bit words) as text, port dropped."""
    import ipaddress

    words = bytes.fromhex(hex_addr.split(":")[0])
    raw = b"".join(words[i : i + 4][::-1] for i in range(0, len(words), 4))
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def listening_addresses(pids: list[int], port: int | None = None) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state owned by `pids` (on `port`)."""
    inodes = set().union(*(_socket_inodes(p) for p in pids))
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                if port is None or int(fields[1].split(":")[1], 16) == port:
                    out.append(_decode(fields[1]))
    return out


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("T")
    except OSError:
        return False


def test_decode_reads_proc_net_tcp_addresses():
    assert _decode("0100007F:1F90") == "127.0.0.1"
    assert _decode("00000000:1F90") == "0.0.0.0"
    assert _decode("00000000000000000000000000000000:1F90") == "::"
    assert _decode("00000000000000000000000001000000:1F90") == "::1"
    assert _decode("0000000000000000FFFF00000100007F:1F90") == "127.0.0.1"


@pytest.mark.parametrize("how", ["launch.py", "torchrun"])
def test_a_two_rank_cpu_run_listens_on_loopback_only(tiny, tt, tmp_path, how):
    """launch.py: every socket of the job is on loopback. torchrun: its agent hosts the store
    (torch binds it on every interface; README says to firewall it), so the ranks' own sockets,
    which the kit controls, are checked."""
    import ipaddress

    args = tt.train_args(
        tiny, "gpt_neox", tmp_path / "ckpt", data_group_size=2, total_steps=50, checkpoint_steps=0
    )
    if how == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        cmd += ["--master-port", str(tt.free_port())]
    else:
        cmd = [sys.executable, str(tt.LAUNCH), "--nproc", "2", "--device", "cpu", "--"]
    launcher = subprocess.Popen(
        [*cmd, str(tt.TRAIN), *args],
        cwd=tt.REPO,
        # Rank 1 freezes at step 3: both ranks are then mid-training, every socket open.
        env=tt.clean_env(OPENCHATKIT_FAULT="step:3@1/stop"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and launcher.poll() is None:
            ranks = _children(launcher.pid)
            if len(ranks) == 2 and any(_stopped(p) for p in ranks):
                break
            time.sleep(0.2)
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        assert len(ranks) == 2 and any(_stopped(p) for p in ranks), "no rank reached step 3"
        addresses = listening_addresses(ranks)
        # gloo listens on each rank (and rank 0 hosts the store under launch.py)
        assert len(addresses) >= (3 if how == "launch.py" else 2), addresses
        exposed = [a for a in addresses if not ipaddress.ip_address(a).is_loopback]
        assert exposed == [], f"listening beyond loopback: {addresses}"
    finally:
        for pid in ranks:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        launcher.kill()
        launcher.communicate()


def test_listen_address_follows_the_rendezvous_host():
    def rdv(host):
        return Rendezvous(0, 2, 0, f"tcp://{host}:29500")

    assert listen_address(rdv("127.0.0.1"), None) == "127.0.0.1"
    assert listen_address(rdv("localhost"), "eth-ignored") == "127.0.0.1"
    assert listen_address(rdv("[::1]"), None) == "::1"
    assert listen_address(rdv("10.1.2.3"), "lo") == "127.0.0.1"  # --net-interface's address
    assert is_loopback("127.0.0.2") and not is_loopback("10.0.0.1")
    with pytest.raises(UserError, match="--net-interface nosuchif0"):
        listen_address(rdv("10.1.2.3"), "nosuchif0")


def test_gloo_is_pinned_to_loopback_for_a_loopback_rendezvous():
    env: dict[str, str] = {}
    pin_socket_interfaces(Rendezvous(0, 2, 0, "tcp://127.0.0.1:1"), None, env)
    assert env == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    env = {"GLOO_SOCKET_IFNAME": "mine"}
    pin_socket_interfaces(Rendezvous(0, 2, 0, "tcp://10.0.0.1:1"), "eth7", env)
    assert env == {"GLOO_SOCKET_IFNAME": "mine", "NCCL_SOCKET_IFNAME": "eth7"}


def test_store_is_bound_to_loopback_and_a_busy_port_is_one_line():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rdv = Rendezvous(0, 1, 0, f"tcp://127.0.0.1:{port}")
    store = open_store(rdv, None, datetime.timedelta(seconds=10))
    store.set("k", "v")
    # Only this store's port: other tests' stores may still live in this process.
    assert listening_addresses([os.getpid()], port) == ["127.0.0.1"]
    with pytest.raises(UserError, match=f"rendezvous port {port} is already in use"):
        open_store(rdv, None, datetime.timedelta(seconds=10))
    del store


def test_job_token_from_the_environment_from_torchrun_or_drawn_by_rank_0():
    import torch.distributed as dist

    store = dist.HashStore()
    token = "a" * 32
    assert job_token(store, 1, env={TOKEN_ENV: token}) == token
    assert job_token(store, 0, env={"TORCHELASTIC_RUN_ID": "f00-ba7"}) == "f00-ba7"
    with pytest.raises(UserError, match=TOKEN_ENV):
        job_token(store, 0, env={TOKEN_ENV: "short"})
    drawn = job_token(store, 0, env={})
    assert len(drawn) == 32 and job_token(store, 1, env={}) == drawn
    assert job_token(dist.HashStore(), 0, env={}) != drawn  # random per job


def test_the_watchdog_keys_carry_the_token():
    import torch.distributed as dist

    from openchatkit.distributed.watchdog import PeerWatchdog

    server = dist.TCPStore("127.0.0.1", 0, 1, True, datetime.timedelta(seconds=10))
    dog = PeerWatchdog("127.0.0.1", server.port, 0, 2, 30.0, token="tok123", on_dead=print)
    dog._beat()
    assert dog.key("dead").startswith("openchatkit/watchdog/tok123/")
    # A neighbour writing the well-known key of the old layout stops nothing.
    server.set("openchatkit/watchdog/0/dead", "pwned")
    assert dog.check() is None
    assert server.add("openchatkit/watchdog/tok123/0/hb/0", 0) >= 2


def test_the_launcher_gives_one_node_a_fresh_token_per_job():
    plan = NodePlan(2, 1, 0, "127.0.0.1", 1)
    a = child_env(plan, 0, {}, "t" * 32)
    assert a[TOKEN_ENV] == "t" * 32
    assert TOKEN_ENV not in child_env(plan, 0, {})
