"""Fault injection, to test the failure path: one rank dies, freezes or hangs at a chosen iteration.

A :class:`Fault` travels with a request from rank 0 (see ``BranchParallelGroup.inject_fault``); the rank it
names triggers it at the start of that iteration's verification. ``kill`` is SIGKILL (the process vanishes),
``stop`` is SIGSTOP (frozen, heartbeat included), ``hang`` sleeps forever while its heartbeat goes on (a live
rank that never joins the next collective, caught only by the collective timeout).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any

from lopa.errors import ConfigError

ACTIONS = ("kill", "stop", "hang")


@dataclass(frozen=True)
class Fault:
    rank: int
    action: str
    iteration: int = 1

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(f"unknown fault action {self.action!r}; choose from {ACTIONS}")
        if self.rank < 1 or self.iteration < 0:
            raise ConfigError("a fault needs a worker rank >= 1 (rank 0 owns the request) and an iteration >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def trigger(self) -> None:
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        while True:  # "hang" (and "stop" once continued): never return to the protocol
            time.sleep(3600)
