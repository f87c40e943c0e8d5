"""A rank that dies while the group starts is reported as fast as one that dies mid-decode, not after the
collective timeout: the launcher gives a dead worker a short grace during start-up instead of timeout + 5 s."""

from __future__ import annotations

import threading
import time

import psutil

from lopa.errors import DistributedError
from lopa.parallel.launch import STARTUP_GRACE_S, BranchParallelGroup

TIMEOUT_S = 60.0  # the collective timeout; before the fix the report came TIMEOUT_S + 5 s after the death


def test_a_rank_killed_during_startup_is_reported_within_the_grace(tiny_ckpt) -> None:
    group = BranchParallelGroup(2, tiny_ckpt, timeout_s=TIMEOUT_S, startup_timeout_s=240)
    outcome: list[BaseException | None] = []

    def start() -> None:
        try:
            group.start()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 (handed to the test thread)
            outcome.append(e)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    while len(group.procs) < 2 and thread.is_alive():
        time.sleep(0.005)
    group.procs[1].kill()  # before it can import torch, let alone reach the start-up barrier
    killed = time.monotonic()
    thread.join(TIMEOUT_S + 30)
    reported = time.monotonic() - killed
    group.kill()
    error = outcome[0]
    assert isinstance(error, DistributedError), repr(error)
    assert "while starting: rank 1 (status -9)" in str(error)
    assert reported < TIMEOUT_S / 2, f"reported {reported:.1f} s after the kill (grace {STARTUP_GRACE_S} s)"
    assert not any(psutil.pid_exists(pid) for pid in group.pids)
