"""BranchParallelRunner: the single-device runner's interface, with the candidates spread over ranks.

Every rank runs the same engine loop (a replicated state machine); only the runner talks to other ranks, so
the engine and the decoders cannot tell it from :class:`lopa.engine.runner.Runner`. Per iteration
(docs/algorithm.md §4):

- ``verify``: candidate ``i`` belongs to rank ``i % world`` (several per rank are batched into ONE local forward
  by the rank's single-device runner, eager or fast path; none is dropped). The forward pre-writes each local
  candidate's window K/V into this rank's own static cache (rows = local candidates). Then one all-gather of
  (score, branch id, iteration, window start) gives every rank every score, so all pick the same winner.
- ``prediction(w)``: the owner of candidate ``w`` broadcasts its per-position prediction (positions and tokens,
  with prob / conf bit-packed into the same int64 tensor): every rank then builds the next candidate set
  itself from these few numbers; never logits.
- ``commit(w, n)``: Commit-Winner-Cache. The owner commits locally and broadcasts the newly committed K/V span
  of every layer together with the frozen last logit (when the model's shift keeps one) in ONE tensor; the
  others overwrite their cache. All ranks' committed caches stay bit-identical.

In a BP x TP mesh (:mod:`lopa.parallel.mesh`) "rank" above means *branch group*: the runner's ``comm`` is the
cross group of this rank's TP rank, the local runner drives a tensor-parallel shard whose cache holds only
this rank's kv heads, and each collective above moves only that shard's share (the K/V shard) or the
replicated numbers (scores, prediction, last logit).

``timing`` splits each request's time into forward, all_reduce (tensor parallelism, taken out of forward),
scoring (local runner), all_gather, broadcast (the prediction) and kv_broadcast, so the cost of
communication is visible next to the compute.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from lopa.decoding.confidence import Prediction, Sampler
from lopa.engine.runner import Candidate, Runner
from lopa.errors import DistributedError
from lopa.model.cache import StaticKVCache
from lopa.parallel.comm import Comm
from lopa.parallel.faults import Fault
from lopa.parallel.mesh import TensorParallel

_GATHER_FIELDS = 4  # score, branch id, iteration, window start


class BranchParallelRunner:
    """One rank's share of every iteration, plus the collectives that keep all ranks in lockstep."""

    def __init__(self, local: Runner, comm: Comm, tp: TensorParallel | None = None) -> None:
        # comm: the cross group (one rank per branch group); rank / world are this branch group's index / count
        self.comm, self.rank, self.world, self.tp = comm, comm.rank, comm.size, tp
        self.local = local  # the single-device runner (eager or fast path) that verifies this rank's share
        self.forwards = 0  # parallel iterations: one per verify, whatever the number of ranks
        self.fault: Fault | None = None
        self._timing: dict[str, float] = {}
        self._cands: list[Candidate] = []

    # ---- the Runner interface ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def model(self) -> torch.nn.Module:
        """The local runner's model (its config says how the engine lays out blocks)."""
        return self.local.model

    @property
    def timing(self) -> dict[str, float]:
        out = {**self.local.timing, **self._timing}
        if self.tp is not None and self.tp.comm.size > 1:  # the forward's all-reduces, reported apart from it
            out["all_reduce"] = self.tp.seconds
            out["forward"] = out.get("forward", 0.0) - self.tp.seconds
        return out

    @property
    def cache(self) -> StaticKVCache | None:
        return self.local.cache

    def begin(self, max_len: int, rows: int, use_cache: bool = True) -> None:
        """Start a request; this rank's cache holds only its share of the ``rows`` candidates."""
        self.local.begin(max_len, rows=max(1, -(-rows // self.world)), use_cache=use_cache)
        self._timing, self.forwards = {}, 0
        if self.tp is not None:
            self.tp.seconds = 0.0

    def verify(
        self, window_start: int, commit_len: int, cands: list[Candidate], sampler: Sampler, iteration: int
    ) -> list[float]:
        """This rank's candidates in one forward, then every candidate's score on every rank."""
        if self.fault is not None and self.fault.iteration == iteration:
            self.fault.trigger()
        self._cands = cands
        mine = cands[self.rank :: self.world]  # candidate i lives on rank i % world, at local row i // world
        local_scores = self.local.verify(window_start, commit_len, mine, sampler, iteration) if mine else []
        t0 = time.perf_counter()
        slots = -(-len(cands) // self.world)
        sent = torch.full((slots, _GATHER_FIELDS), float("nan"), dtype=torch.float64)  # (slots, fields)
        for j, score in enumerate(local_scores):
            sent[j] = torch.tensor([score, self.rank + j * self.world, iteration, window_start], dtype=torch.float64)
        got = self.comm.all_gather(sent, "verify/all_gather")  # world x (slots, fields)
        scores = []
        for i in range(len(cands)):
            row = got[i % self.world][i // self.world]
            if row[1:].tolist() != [i, iteration, window_start]:
                raise self.comm.monitor.failure(
                    "verify/all_gather",
                    DistributedError(f"rank {i % self.world} sent {row.tolist()} for candidate {i}: ranks diverged"),
                )
            scores.append(float(row[0]))  # float64 carries the single-device score exactly
        self._tick("all_gather", t0)
        self.forwards += 1
        return scores

    def prediction(self, index: int) -> Prediction:
        """Candidate ``index``'s prediction, sent by its owner (positions, tokens, prob, conf: O(m) numbers)."""
        owner, row = index % self.world, index // self.world
        t0 = time.perf_counter()
        positions = self._cands[index].predict  # (m,) every rank knows which positions were predicted
        packed = torch.empty(4, positions.numel(), dtype=torch.long)  # (4, m)
        if owner == self.rank:
            packed = _pack(self.local.prediction(row))
        packed = self.comm.broadcast(packed, owner, "prediction/broadcast")
        pred = _unpack(packed)
        if not torch.equal(pred.positions, positions):
            raise self.comm.monitor.failure(
                "prediction/broadcast", DistributedError(f"rank {owner} predicted other positions: ranks diverged")
            )
        self._tick("broadcast", t0)
        return pred

    def commit(self, index: int, n: int) -> None:
        """Commit-Winner-Cache: the owner's first ``n`` window positions become every rank's committed prefix."""
        cache = self.local.cache
        if cache is None:
            return
        if n == 0:
            cache.rollback()
            return
        owner, row = index % self.world, index // self.world
        t0 = time.perf_counter()
        start, end = cache.committed, cache.committed + n
        layers, _, heads, _, dim = cache.k.shape
        vocab = int(self.local.model.config.vocab_size) if self.local.shift else 0  # size of the frozen logit
        if owner == self.rank:
            self.local.commit(row, n)  # every local row gets the winner's span; last_logit is saved
            k, v = cache.span(start, end, row=0)  # each (layers, kv_heads, n, head_dim)
            # logits come out in the model dtype, which is also the cache dtype: the cast is exact
            payload = torch.cat([k.flatten(), v.flatten(), self.local.last_logit.to(k.dtype)])
        else:
            payload = torch.empty(2 * layers * heads * n * dim + vocab, dtype=cache.k.dtype, device=cache.k.device)
        payload = self.comm.broadcast(payload, owner, "commit/kv_broadcast").to(cache.k.device)
        if owner != self.rank:
            span = layers * heads * n * dim
            k = payload[:span].view(layers, heads, n, dim)
            v = payload[span : 2 * span].view(layers, heads, n, dim)
            cache.overwrite(start, k, v)
            cache.committed = cache.written = end  # the span is now committed here too, as on the owner
            self.local.last_logit = payload[2 * span :].clone()  # (vocab,), or (0,) without a shift
        self._tick("kv_broadcast", t0)

    def committed_kv(self) -> tuple[Tensor, Tensor]:
        """This rank's committed K/V (layers, kv_heads, committed, head_dim) each: equal on every rank."""
        return self.local.committed_kv()

    def _tick(self, phase: str, t0: float) -> None:
        self._timing[phase] = self._timing.get(phase, 0.0) + time.perf_counter() - t0


def _pack(p: Prediction) -> Tensor:
    """(4, m) int64: positions, tokens, and the float32 bits of prob and conf (one broadcast instead of two)."""
    bits = torch.stack([p.prob.float(), p.conf.float()]).contiguous().view(torch.int32).long()  # (2, m)
    return torch.cat([torch.stack([p.positions, p.tokens]).long(), bits])


def _unpack(packed: Tensor) -> Prediction:
    floats = packed[2:].int().contiguous().view(torch.float32)  # (2, m) the exact float32 values sent
    return Prediction(packed[0].clone(), packed[1].clone(), floats[0].clone(), floats[1].clone())
