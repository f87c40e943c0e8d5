"""Collectives with a deadline: every all-gather, broadcast and all-reduce of the mesh goes through :class:`Comm`.

Each collective is started asynchronously and waited on in short slices. Between slices the monitor is asked
whether a rank died or froze, so a dead rank is reported in seconds, not at the timeout; a live rank that never
joins is reported when ``timeout_s`` runs out. A failed collective raises :class:`~lopa.errors.DistributedError`
naming the rank to blame (see :mod:`lopa.parallel.monitor`). With NCCL the tensors travel through the rank's GPU;
callers always pass and get CPU tensors.

A :class:`Comm` spans the default group (the request channel) or one sub-group of the BP x TP mesh (see
:mod:`lopa.parallel.mesh`): ``rank`` and ``size`` are then positions inside that sub-group, and ``broadcast``'s
``src`` is a position too. All-reduces (tensor parallelism) stay on the tensor's device and are counted apart
from the mesh collectives (:meth:`Monitor.enter`), since branch groups without candidates skip their forward.

Used by :class:`lopa.parallel.runner.BranchParallelRunner`, the tensor-parallel all-reduce and the request channel
in :mod:`lopa.parallel.replay`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from lopa.parallel.monitor import Monitor
from lopa.parallel.process_group import DistContext

SLICE_S = 0.5  # how often a waiting rank looks at the heartbeats


class Comm:
    """Timed collectives over the default process group, or over the sub-group ``group`` of global ``ranks``."""

    def __init__(
        self, ctx: DistContext, monitor: Monitor, group: dist.ProcessGroup | None = None, ranks: list[int] | None = None
    ) -> None:
        self.ctx, self.monitor, self.group = ctx, monitor, group
        self.ranks = list(ranks) if ranks is not None else list(range(ctx.world_size))  # global ranks, in order
        self.rank, self.size = self.ranks.index(ctx.rank), len(self.ranks)  # this rank's position, group size
        self._on_gpu = ctx.backend == "nccl"

    def all_gather(self, t: Tensor, stage: str) -> list[Tensor]:
        """Every member's ``t`` (same shape and dtype on every member), in group order."""
        if self.size == 1:  # nothing to exchange: skip the backend's round trip
            return [t]
        x = self._to_dev(t)
        out = [torch.empty_like(x) for _ in range(self.size)]
        self._run(stage, lambda: dist.all_gather(out, x, group=self.group, async_op=True))
        return [o.cpu() for o in out]

    def broadcast(self, t: Tensor, src: int, stage: str) -> Tensor:
        """Member ``src``'s ``t`` on every member (receivers pass a buffer of the right shape and dtype)."""
        if self.size == 1:
            return t
        x = self._to_dev(t)
        root = self.ranks[src]
        self._run(stage, lambda: dist.broadcast(x, root, group=self.group, async_op=True))
        return x.cpu() if self._on_gpu else x

    def all_reduce(self, t: Tensor, stage: str) -> Tensor:
        """The sum of every member's ``t``, in place, on ``t``'s own device (tensor parallelism)."""
        if self.size == 1:
            return t
        x = t.contiguous()
        self._run(stage, lambda: dist.all_reduce(x, group=self.group, async_op=True), counted=False)
        return x

    def _to_dev(self, t: Tensor) -> Tensor:
        return t.to(self.ctx.device).contiguous() if self._on_gpu else t.contiguous()

    def _run(self, stage: str, start: Callable[[], dist.Work | None], counted: bool = True) -> None:
        self.monitor.enter(stage, counted)
        try:
            work = start()
        except RuntimeError as e:  # a peer already vanished while the collective was being set up
            raise self.monitor.failure(stage, e, wait_s=self.monitor.stale_s) from e
        assert work is not None
        deadline = time.monotonic() + self.ctx.timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                work.wait(timeout=timedelta(seconds=max(min(SLICE_S, left), 0.001)))
                return
            except RuntimeError as e:
                if work.is_completed():  # it ended with an error (a peer closed its connection): find out who
                    raise self.monitor.failure(stage, e, wait_s=self.monitor.stale_s) from e
                if self.monitor.unresponsive() or left <= SLICE_S:
                    late = TimeoutError(f"no answer within {time.monotonic() - deadline + self.ctx.timeout_s:.1f} s")
                    raise self.monitor.failure(stage, late) from None
