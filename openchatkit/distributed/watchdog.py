"""Peer watchdog: every rank notices within `--peer-timeout` seconds plus one heartbeat period
(min(5, timeout / 12) s) that another rank died or froze, names it, and exits non-zero — on one node or many, NCCL or gloo, with or without a launcher.

Why: when a rank dies, its peers usually block inside a collective or a point-to-point receive.
gloo often fails fast with a connection reset, but NCCL (and gloo when a peer is frozen rather
than dead, or a whole node drops off the network) waits for the process-group timeout (600 s),
and the launcher of another node never learns of it. The rendezvous TCP store every rank is
already connected to is the one place all ranks can reach, so liveness goes through it:

- each rank bumps its counter `hb/<rank>` every round (a third of the heartbeat period) from a daemon thread (the
  thread runs while the main thread waits inside a collective: those release the GIL);
- each rank watches the next two ranks on a ring. If none of several dead ranks were watched by a
  live rank, every rank before them on the ring would be dead too, i.e. all of them; so one
  death is always seen, and the watch costs O(world size) store traffic, not O(world size^2);
- whoever sees a counter stand still for `timeout` seconds (or a rank raise an error) writes
  the key `dead`; every rank reads it each round, prints one line naming the rank and exits 1;
- when the store itself is gone, the rank that hosted it (rank 0, unless torchrun's agent hosts
  it) is the one that died;
- a rank that finishes writes `done/<rank>` and is no longer watched; the store host waits for
  every `done` before it exits, so the store outlives the others' watchdogs.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

PREFIX = "openchatkit/watchdog"
NUM_WATCHED = 2  # ring neighbours each rank watches
# Rounds (heartbeat + check) per heartbeat period of timeout / 12: three, so that detection
# (up to two rounds late: the count is first seen one round after the last beat, and checked
# once a round) plus reading `dead` (one more round) add at most one period to the timeout.
ROUNDS_PER_PERIOD = 3
STORE_FAILURES = 3 * ROUNDS_PER_PERIOD  # consecutive store errors (three periods): host dead


def uses_agent_store() -> bool:
    """torchrun's agent, not rank 0, hosts the store (so rank 0's death does not take it down)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"


def watched_ranks(rank: int, world_size: int) -> list[int]:
    """The ring neighbours `rank` watches: the next NUM_WATCHED ranks, never itself."""
    return [(rank + k) % world_size for k in range(1, min(NUM_WATCHED, world_size - 1) + 1)]


class PeerWatchdog:
    """Heartbeats for this rank and watch over its ring neighbours (see the module docstring).

    `token` is the job's random token (`openchatkit.distributed.env.job_token`), part of every
    key. `on_dead(message)` is called once, from the watchdog thread, when a peer is found dead; the
    default prints the message and ends the process with exit code 1 (the main thread is most
    likely blocked in a collective and cannot be unwound).
    """

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        timeout: float,
        describe: Callable[[int], str] = lambda r: f"rank {r}",
        on_dead: Callable[[str], None] | None = None,
        token: str = "",
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        # Seconds between rounds: a third of the heartbeat period min(5, timeout / 12).
        self.interval = max(0.1, min(5.0, timeout / 12)) / ROUNDS_PER_PERIOD
        self.describe = describe
        self.on_dead = on_dead or self._exit_with
        self.hosts_store = rank == 0 and not uses_agent_store()
        self.where = f"{host}:{port}"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        # The job's token (`env.job_token`) in every key: a neighbour's job on the same store
        # cannot collide with these keys, nor stop this run by writing a well-known `dead` key.
        self.prefix = f"{PREFIX}/{token}/{attempt}" if token else f"{PREFIX}/{attempt}"
        # A client connection of its own: the process group's store is used by the main thread.
        # Its timeout bounds how long one store call can block when the store host is gone.
        self.store = dist.TCPStore(
            host,
            port,
            world_size,
            is_master=False,
            timeout=datetime.timedelta(seconds=max(2.0, 2 * self.interval)),
            wait_for_workers=False,
        )
        self.lock = threading.Lock()  # one store call at a time (thread and main thread)
        self.stopped = threading.Event()
        self.watched = watched_ranks(rank, world_size)
        self.last_seen: dict[int, tuple[int, float]] = {}  # rank -> (counter, monotonic time)
        self.store_failures = 0
        self.store_lost = False  # set once the store host is declared dead: no more store calls
        self.thread = threading.Thread(target=self._loop, name="peer-watchdog", daemon=True)

    @property
    def stop_bound_s(self) -> float:
        """Seconds from a peer's death (or freeze) until every watchdog has called `on_dead`:
        --peer-timeout plus one heartbeat period (min(5, timeout / 12) s; 65 s at the default
        60), plus scheduling delays. A store call that blocks adds its own timeout."""
        return self.timeout + ROUNDS_PER_PERIOD * self.interval

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def start(self) -> PeerWatchdog:
        self._beat()
        self.thread.start()
        return self

    # -- the thread -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            message = self._round()
            if message and not self.stopped.is_set():
                self.stopped.set()
                self.on_dead(message)
                return

    def _round(self) -> str | None:
        """`check()`, counting store failures: STORE_FAILURES in a row mean the store host died."""
        try:
            message = self.check()
        except Exception:  # noqa: BLE001 - any store failure means the same thing here
            self.store_failures += 1
            return self._store_lost_message() if self.store_failures >= STORE_FAILURES else None
        self.store_failures = 0
        return message

    def _beat(self) -> None:
        with self.lock:
            self.store.add(self.key(f"hb/{self.rank}"), 1)

    def check(self) -> str | None:
        """One round: heartbeat, read `dead`, look at the watched ranks. Returns the message to
        stop with, or None. Raises when the store cannot be reached."""
        self._beat()
        now = time.monotonic()
        with self.lock:
            if self.store.check([self.key("dead")]):
                return self._message(self.store.get(self.key("dead")).decode())
            for peer in self.watched:
                count = self.store.add(self.key(f"hb/{peer}"), 0)
                seen = self.last_seen.get(peer)
                if seen is None or seen[0] != count:
                    self.last_seen[peer] = (count, now)
                    continue
                if now - seen[1] < self.timeout:
                    continue
                if self.store.check([self.key(f"done/{peer}")]):
                    continue
                culprit = (
                    f"{self.describe(peer)} stopped responding: no heartbeat for "
                    f"{now - seen[1]:.0f} s (--peer-timeout {self.timeout:g})"
                )
                self.store.compare_set(self.key("dead"), "", culprit)
                return self._message(self.store.get(self.key("dead")).decode())
        return None

    def _store_lost_message(self) -> str:
        self.store_lost = True
        host = "torchrun's agent on node 0" if uses_agent_store() else self.describe(0)
        return self._message(
            f"{host} died: the rendezvous store at {self.where} (hosted there) is unreachable"
        )

    def _message(self, culprit: str) -> str:
        return f"{self.describe(self.rank)}: {culprit}; stopping"

    # -- called by the main thread ----------------------------------------------------------------
    def report_failure(self, error: str) -> None:
        """This rank is failing with `error`: tell the others at once (first report wins)."""
        culprit = f"{self.describe(self.rank)} failed: {error[:300]}"
        try:
            with self.lock:
                self.store.compare_set(self.key("dead"), "", culprit)
        except Exception:  # noqa: BLE001 - the store may be gone too; the heartbeat covers it
            pass

    def name_lost_peer(self, wait_s: float | None = None) -> str | None:
        """After a communication error in the main thread: wait (up to a peer timeout) until the
        watchdogs agree which rank is gone, and return the line to stop with."""
        self.stopped.set()  # from here on the main thread checks alone (one line, not two)
        if self.thread.is_alive():
            self.thread.join(timeout=2 * self.interval + 1)
        deadline = time.monotonic() + (
            self.timeout + 3 * self.interval if wait_s is None else wait_s
        )
        while time.monotonic() < deadline:
            message = self._round()
            if message:
                return message
            time.sleep(self.interval)
        return None

    def stop(self, clean: bool) -> None:
        """Stop watching. `clean`: this rank finished normally; the store host then waits (up to
        a peer timeout) for every rank to finish, so its store outlives their watchdogs."""
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2 * self.interval + 1)
        if self.store_lost:
            return
        try:
            with self.lock:
                self.store.set(self.key(f"done/{self.rank}"), "1")
                if clean and self.hosts_store:
                    keys = [self.key(f"done/{r}") for r in range(self.world_size)]
                    self.store.set_timeout(datetime.timedelta(seconds=self.timeout))
                    self.store.wait(keys)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        if not clean:
            self._linger()

    def _linger(self) -> None:
        """On a failed exit the store host stays a little, so every other rank reads `dead`
        (within one interval) instead of finding the store gone and blaming the host."""
        if self.hosts_store:
            time.sleep(2 * self.interval + 1)

    def _exit_with(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        self._linger()
        os._exit(1)
