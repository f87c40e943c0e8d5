"""Process-group setup for branch parallelism, from torchrun's environment (or the ``--bp`` launcher's, which
sets the same variables).

Owns: reading RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, the rendezvous store, the startup
barrier and ``init_process_group`` (gloo on CPU, NCCL on CUDA) with the collective timeout. Called by
:mod:`lopa.parallel.launch` (``lopa generate --branch-parallel`` and the ranks the launcher spawns).

Two timeouts: ``startup_timeout_s`` bounds how long ranks wait for each other to start and load the model
(importing torch alone can take many seconds on a busy machine); ``timeout_s`` bounds every collective once
the group runs. The startup barrier runs on the store first, so the process group itself can be created with
the short collective timeout.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lopa.config import DEFAULT_DIST_TIMEOUT_S, DEFAULT_STARTUP_TIMEOUT_S
from lopa.errors import ConfigError, DistributedError

DEFAULT_TIMEOUT_S = DEFAULT_DIST_TIMEOUT_S  # every collective (and the dead-rank detection) finishes within this
TIMEOUT_ENV = "LOPA_DIST_TIMEOUT"  # seconds; overrides the default when no timeout is passed
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistContext:
    """Where this process sits in the branch-parallel group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout_s: float
    host: str
    port: int
    store: dist.Store  # lopa's own keys (heartbeats, request doorbells), prefixed apart from the group's
    agent_store: bool  # the store is torchrun's agent store (every rank is a client)

    def mark_failed(self, error: Exception) -> None:
        """Tell the other ranks this one failed with its own error (``failed/<rank>``), so a rank that merely
        reacts to it is not blamed; the store may already be gone with rank 0."""
        try:
            self.store.set(f"failed/{self.rank}", f"rank {self.rank} failed: {error}")
        except Exception as e:
            print(f"lopa rank {self.rank}: could not report the failure: {e}", file=sys.stderr, flush=True)

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def new_store_client(self) -> dist.Store:
        """A separate connection to the store, for a thread that must not wait behind this one's calls."""
        base = dist.TCPStore(self.host, self.port, self.world_size, False, timeout=timedelta(seconds=self.timeout_s))
        return dist.PrefixStore(_prefix(), base)

    def store_barrier(
        self, name: str, timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S, watch: Callable[[], str | None] | None = None
    ) -> None:
        """Wait until every rank reached ``name`` (store-based: no collective timeout applies).

        ``watch`` (optional) is asked while waiting; a message from it (a rank this process started has exited)
        ends the wait with a DistributedError at once."""
        _store_barrier(self.store, name, self.world_size, timeout_s, watch)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for launching ranks on this machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_timeout(timeout_s: float | None) -> float:
    """The collective timeout: the argument, else $LOPA_DIST_TIMEOUT, else the default."""
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV)
        try:
            timeout_s = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ConfigError(f"${TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not timeout_s > 0:
        raise ConfigError(f"the branch-parallel timeout must be > 0 seconds, got {timeout_s}")
    return float(timeout_s)


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the environment torchrun (or the launcher) sets."""
    missing = [k for k in _ENV if not os.environ.get(k)]
    if missing:
        raise DistributedError(
            f"branch-parallel mode needs the torchrun environment ({', '.join(missing)} not set): start it with "
            "`torchrun --nproc-per-node N -m lopa generate --branch-parallel ...`, or use `lopa generate --bp N`"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def device_for(device: str | torch.device, local_rank: int) -> torch.device:
    """CPU stays CPU; CUDA means one GPU per rank, chosen by the local rank."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"local rank {local_rank} needs GPU {local_rank} but only {torch.cuda.device_count()} are visible; "
            "run at most one rank per GPU"
        )
    return torch.device("cuda", local_rank)


def init_distributed(
    device: str | torch.device = "cpu",
    timeout_s: float | None = None,
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    watch: Callable[[], str | None] | None = None,
) -> DistContext:
    """Join the group described by the environment; returns this rank's context (``watch``: see store_barrier)."""
    rank, world, local_rank = env_ranks()
    timeout_s = resolve_timeout(timeout_s)
    dev = device_for(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before the group exists, so NCCL binds this rank to its own GPU
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    start = timedelta(seconds=startup_timeout_s)
    try:
        if agent:  # torchrun's agent already serves a store at MASTER_ADDR:MASTER_PORT
            base = dist.TCPStore(host, port, world, False, timeout=start)
        else:
            base = dist.TCPStore(host, port, world, rank == 0, timeout=start, multi_tenant=True)
    except (RuntimeError, OSError) as e:
        raise DistributedError(f"rank {rank}: cannot reach the rendezvous store at {host}:{port}: {e}") from e
    store = dist.PrefixStore(_prefix(), base)
    _store_barrier(store, "started", world, startup_timeout_s, watch)
    dist.init_process_group(
        backend, store=dist.PrefixStore(_prefix() + "/pg", base), rank=rank, world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )  # fmt: skip
    return DistContext(rank, world, local_rank, dev, backend, timeout_s, host, port, store, agent)


def shutdown() -> None:
    """Leave the group (only on the normal path: a failed group is left by exiting the process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _prefix() -> str:
    # a torchrun restart reuses the agent store: keep each attempt's keys apart
    return f"lopa/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _store_barrier(
    store: dist.Store, name: str, world: int, timeout_s: float, watch: Callable[[], str | None] | None = None
) -> None:
    arrived = store.add(f"barrier/{name}", 1)
    if arrived == world:
        store.set(f"barrier/{name}/done", "1")
    deadline = time.monotonic() + timeout_s
    while not store.check([f"barrier/{name}/done"]):  # polling: store.wait logs a warning on every timeout
        failed = [r for r in range(world) if store.check([f"failed/{r}"])]
        if failed:
            raise DistributedError(f"branch-parallel startup failed: {store.get(f'failed/{failed[0]}').decode()}")
        why = watch() if watch is not None else None
        if why:
            raise DistributedError(f"branch-parallel startup failed: {why}")
        if time.monotonic() > deadline:
            count = int(store.add(f"barrier/{name}", 0))
            raise DistributedError(
                f"only {count} of {world} ranks reached '{name}' within {timeout_s:.0f} s; check the other ranks' "
                "logs (a rank that failed to start or to load the model stops the whole group)"
            )
        time.sleep(0.02)
