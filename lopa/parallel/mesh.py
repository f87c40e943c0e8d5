"""The BP x TP mesh: ``bp`` branch groups of ``tp`` tensor-parallel ranks (docs/dist.md has the picture).

Global rank ``r`` is TP rank ``r % tp`` of branch group ``r // tp``. Two families of sub-groups:

- the *TP group* of a branch group (``tp`` ranks holding one model between them): the all-reduces of every
  layer's forward;
- the *cross group* of TP rank ``t`` (rank ``t`` of every branch group, ``bp`` ranks holding the same shard):
  score all-gather, prediction broadcast and Commit-Winner-Cache. Rank ``t`` of the winning group broadcasts
  its own K/V shard to rank ``t`` of the others, so no K/V ever goes through one rank. Every TP rank of a
  group computes the same scores (the LM head is replicated), so each cross group gathers them on its own
  and no second hop inside the group is needed.

:func:`build_mesh` creates the groups (every rank calls ``new_group`` for every group, in the same order);
:class:`TensorParallel` binds a sharded model's all-reduce hook to the TP group's timed collective and keeps
the all-reduce time apart from the forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist
from torch import Tensor, nn

from lopa.errors import ConfigError
from lopa.model.tp import TPShard
from lopa.parallel.comm import Comm
from lopa.parallel.monitor import Monitor
from lopa.parallel.process_group import DistContext


@dataclass
class Mesh:
    """Where this rank sits in the mesh, and its two sub-groups (None where the group has one rank)."""

    bp: int
    tp: int
    branch_group: int  # which branch group this rank belongs to
    tp_rank: int  # its rank inside the branch group's tensor-parallel group
    tp_ranks: list[int]  # global ranks of its TP group
    cross_ranks: list[int]  # global ranks holding the same shard in every branch group
    tp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    cross_group: dist.ProcessGroup | None = field(default=None, repr=False)

    @property
    def shard(self) -> TPShard:
        return TPShard(self.tp_rank, self.tp)


def mesh_shape(world: int, tp: int) -> tuple[int, int]:
    """(bp, tp) for ``world`` ranks split into tensor-parallel groups of ``tp``; named error if it does not fit."""
    if tp < 1 or world % tp:
        raise ConfigError(f"--tp {tp} must divide the number of ranks ({world}): ranks = branch groups x tp")
    return world // tp, tp


def layout(rank: int, world: int, tp: int) -> Mesh:
    """The mesh coordinates of ``rank`` (no process groups yet)."""
    bp, tp = mesh_shape(world, tp)
    g, t = divmod(rank, tp)
    return Mesh(bp, tp, g, t, [g * tp + i for i in range(tp)], [j * tp + t for j in range(bp)])


def build_mesh(ctx: DistContext, tp: int) -> Mesh:
    """This rank's mesh with its process groups; a collective call: every rank of the world must make it."""
    mesh = layout(ctx.rank, ctx.world_size, tp)
    timeout = timedelta(seconds=ctx.timeout_s)
    # a family whose one group spans the world uses the default group (None); groups of one rank need none
    for g in range(mesh.bp):
        ranks = [g * tp + i for i in range(tp)]
        if tp > 1:
            pg = None if mesh.bp == 1 else dist.new_group(ranks, timeout=timeout)
            if ctx.rank in ranks:
                mesh.tp_group = pg
    for t in range(tp):
        ranks = [j * tp + t for j in range(mesh.bp)]
        if mesh.bp > 1:
            pg = None if mesh.tp == 1 else dist.new_group(ranks, timeout=timeout)
            if ctx.rank in ranks:
                mesh.cross_group = pg
    return mesh


class TensorParallel:
    """The TP group's all-reduce, bound into a sharded model; ``seconds`` is the time spent in it."""

    def __init__(self, ctx: DistContext, monitor: Monitor, mesh: Mesh) -> None:
        self.comm = Comm(ctx, monitor, mesh.tp_group, mesh.tp_ranks)
        self.seconds = 0.0

    def bind(self, model: nn.Module) -> None:
        hook = getattr(model, "tp_reduce", None)
        if self.comm.size > 1:
            if hook is None:
                raise ConfigError("tensor parallelism needs a sharded model (load it with shard=TPShard(...))")
            hook.fn = self.all_reduce

    def all_reduce(self, t: Tensor) -> Tensor:
        t0 = time.perf_counter()
        out = self.comm.all_reduce(t, "forward/all_reduce")
        self.seconds += time.perf_counter() - t0
        return out
