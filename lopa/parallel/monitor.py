"""Liveness of the ranks: a heartbeat thread per rank, and the diagnosis that names a dead or stuck rank.

Every rank publishes ``hb/<rank>`` on the store every ``interval_s``: a beat counter, the number of collectives
it has entered (``seq``), the tensor-parallel all-reduces it has entered (``tp_seq``), its pid, host and current
stage, and reads every other rank's heartbeat. A rank whose process is gone or stopped (seen in /proc when it runs
on this host), or whose beat has not changed for ``stale_s``, is *unresponsive*. A rank that is alive but never
reaches a collective shows up as *behind*: its ``seq`` is lower than ours, or, for a rank of our own
tensor-parallel group, the same ``seq`` and a lower ``tp_seq`` (all-reduces are counted apart: a branch group
without candidates skips its forward). A rank that gave up because of someone else's failure writes
``failed/<rank>`` first, so it is not blamed for the failure it reacted to. The thread also ends the process when
its parent (the launcher or torchrun's agent) is gone, so no rank outlives its launcher.

Used by :class:`lopa.parallel.comm.Comm` (waits in slices and asks :meth:`Monitor.unresponsive` between them)
and by the request loop of idle workers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

from lopa.errors import DistributedError
from lopa.parallel.process_group import DistContext

HEARTBEAT_S = 0.2
EXIT_ORPHANED = 3  # exit status of a rank whose launcher disappeared
EXIT_LOST = 4  # exit status of a rank that lost the store (rank 0 is gone)


@dataclass
class Peer:
    beat: int
    seq: int
    tp_seq: int
    pid: int
    host: str
    stage: str
    changed: float  # time.monotonic() when the beat last changed


class Monitor:
    """Heartbeats out, heartbeats in, and the failure message."""

    def __init__(
        self,
        ctx: DistContext,
        interval_s: float = HEARTBEAT_S,
        stale_s: float | None = None,
        tp_ranks: list[int] | None = None,
    ) -> None:
        self.ctx, self.rank, self.interval_s = ctx, ctx.rank, interval_s
        self.tp_ranks = set(tp_ranks or [self.rank])  # this rank's tensor-parallel group (global ranks)
        self.tp_seq = 0
        # a live rank on a loaded machine can miss a few beats; never wait longer than the collective timeout
        self.stale_s = stale_s if stale_s is not None else min(ctx.timeout_s, max(15 * interval_s, 3.0))
        self.seq, self.stage = 0, "start"
        self.peers: dict[int, Peer] = {}
        self._host, self._ppid, self._beat = socket.gethostname(), os.getppid(), 0
        self._started = time.monotonic()
        self._client = ctx.new_store_client()
        self._stopping = threading.Event()
        self._publish()  # our key exists before anyone can look for it
        self._thread = threading.Thread(target=self._loop, name=f"lopa-heartbeat-{self.rank}", daemon=True)
        self._thread.start()

    @property
    def others(self) -> list[int]:
        return [r for r in range(self.ctx.world_size) if r != self.rank]

    def enter(self, stage: str, counted: bool = True) -> int:
        """Called before each collective: its sequence number, which every rank reaches in the same order.

        ``counted=False`` (tensor-parallel all-reduces) counts in ``tp_seq``, which only the ranks of one
        tensor-parallel group share."""
        self.stage = stage
        if not counted:
            self.tp_seq += 1
            return self.tp_seq
        self.seq += 1
        return self.seq

    def stop(self) -> None:
        self._stopping.set()

    # ---- heartbeat thread ----------------------------------------------------------------------------
    def _publish(self) -> None:
        self._beat += 1
        stage = self.stage.replace(" ", "_")
        self._client.set(f"hb/{self.rank}", f"{self._beat} {self.seq} {self.tp_seq} {os.getpid()} {self._host} {stage}")

    def _loop(self) -> None:
        while not self._stopping.wait(self.interval_s):
            if os.getppid() != self._ppid:
                print(f"lopa rank {self.rank}: launcher exited; stopping", file=sys.stderr, flush=True)
                os._exit(EXIT_ORPHANED)
            try:
                self._publish()
                self._read_peers()
            except Exception as e:  # the store lives in rank 0 (or torchrun's agent): without it, the group is gone
                if self._stopping.is_set():
                    return
                print(f"lopa rank {self.rank}: lost the rendezvous store ({e}); stopping", file=sys.stderr, flush=True)
                os._exit(EXIT_LOST)

    def _read_peers(self) -> None:
        now = time.monotonic()
        for r in self.others:
            key = f"hb/{r}"
            if not self._client.check([key]):
                continue
            beat, seq, tp_seq, pid, host, stage = self._client.get(key).decode().split(" ", 5)
            old = self.peers.get(r)
            changed = now if old is None or old.beat != int(beat) else old.changed
            self.peers[r] = Peer(int(beat), int(seq), int(tp_seq), int(pid), host, stage, changed)

    # ---- diagnosis -----------------------------------------------------------------------------------
    def unresponsive(self, ranks: list[int] | None = None) -> dict[int, str]:
        """Ranks that are dead or frozen, each with the reason."""
        out, now = {}, time.monotonic()
        for r in ranks if ranks is not None else self.others:
            p = self.peers.get(r)
            if p is None:
                if now - self._started > self.stale_s:
                    out[r] = f"rank {r} never sent a heartbeat"
                continue
            state = process_state(p.pid) if p.host == self._host else None
            if state in ("gone", "Z", "X"):
                out[r] = f"rank {r} (pid {p.pid}) exited"
            elif state in ("T", "t"):
                out[r] = f"rank {r} (pid {p.pid}) is stopped (SIGSTOP or a debugger)"
            elif now - p.changed > self.stale_s:
                out[r] = f"rank {r} (pid {p.pid}) sent no heartbeat for {now - p.changed:.1f} s (dead or frozen)"
        return out

    def reports(self) -> dict[int, str]:
        """Failure messages other ranks wrote before giving up."""
        store = self.ctx.store
        return {r: store.get(f"failed/{r}").decode() for r in self.others if store.check([f"failed/{r}"])}

    def failure(self, what: str, error: BaseException | None, wait_s: float = 0.0) -> DistributedError:
        """The error naming the rank(s) to blame for ``what`` failing; waits up to ``wait_s`` for evidence.

        Also writes this rank's own report, so ranks that see the failure later do not blame this one.
        """
        deadline = time.monotonic() + wait_s
        while True:
            # dead ranks first: a rank that reported and then exited is then sure to show its report too
            dead = self.unresponsive()
            reports = self.reports()
            culprits = [why for r, why in dead.items() if r not in reports]
            if culprits or reports or time.monotonic() >= deadline:  # a report already says what went wrong
                break
            time.sleep(self.interval_s)
        behind = [r for r, p in self.peers.items() if r not in dead and r not in reports and self._behind(r, p)]
        behind = sorted(self._furthest_behind(behind))
        if culprits:
            cause = "; ".join(culprits)
        elif behind:
            cause = "; ".join(
                f"rank {r} is stuck: it never reached collective {self._at(self.seq, self.tp_seq)} ({self.stage}); it "
                f"is at {self._at(self.peers[r].seq, self.peers[r].tp_seq)} ({self.peers[r].stage})"
                for r in behind
            )
        elif reports:
            cause = "; ".join(f"{msg} (reported by rank {r})" for r, msg in sorted(reports.items()))
        else:
            cause = f"{what} failed: {error}" if error is not None else f"{what} failed"
        self.report(cause)
        return DistributedError(
            f"branch-parallel group failed: {cause} (noticed by rank {self.rank} during {what}, collective "
            f"{self._at(self.seq, self.tp_seq)}). All ranks stop; check that rank's log, then start again."
        )

    def _at(self, seq: int, tp_seq: int) -> str:
        """'#seq', or '#seq.tp_seq' (mesh collective . all-reduce) under tensor parallelism."""
        return f"#{seq}" if len(self.tp_ranks) == 1 else f"#{seq}.{tp_seq}"

    def _behind(self, r: int, p: Peer) -> bool:
        if p.seq != self.seq:
            return p.seq < self.seq
        return r in self.tp_ranks and p.tp_seq < self.tp_seq

    def _furthest_behind(self, ranks: list[int]) -> list[int]:
        """Of the ranks behind, those no rank of the same TP group is further behind than: a TP group waiting
        in an all-reduce for its stuck member is behind too, but only the member is to blame."""
        size = len(self.tp_ranks)
        progress = {r: (self.peers[r].seq, self.peers[r].tp_seq) for r in ranks}
        return [r for r in ranks if not any(q // size == r // size and progress[q] < progress[r] for q in ranks)]

    def report(self, cause: str) -> None:
        """Tell the other ranks this one is giving up, and why (best effort: the store may be gone)."""
        with contextlib.suppress(Exception):  # reporting is a courtesy; the caller raises or exits anyway
            self.ctx.store.set(f"failed/{self.rank}", cause)


def process_state(pid: int) -> str | None:
    """State letter of a local process from /proc ('R', 'S', 'T', 'Z', ...), 'gone' if it does not exist,
    None where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except FileNotFoundError:
        return "gone" if os.path.isdir("/proc/self") else None
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0]  # the command name may contain spaces: the state follows ')'
