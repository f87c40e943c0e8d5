"""BatchRunner: ONE forward verifies the candidates of many sequences (each its anchor + k lookahead branches).

The scheduler hands it, per sequence, the :class:`~lopa.engine.sequence.Plan` of this iteration and the
sequence's sampler. :meth:`verify` lays every candidate of every sequence out as one row of a padded batch
(sequences may differ in window start, window length, number of branches, decoder and sampling settings),
runs :func:`~lopa.model.pooled.pooled_forward` over the committed prefixes kept in a :class:`KVPool`, and
returns one :class:`SlotView` per sequence: its branch scores, and the same ``prediction(i)`` /
``commit(i, n)`` calls the single-sequence runner offers, so ``Sequence.advance`` cannot tell the two apart.
Token choice is per row, with the row's own sampler and the generator of its own (seed, iteration, stream),
so a sequence's output does not depend on what else runs in the batch. Vanilla sequences (no cache, whole
sequence every step) go through :meth:`verify_uncached`, a batch of their own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lopa.decoding.confidence import Prediction, Sampler
from lopa.engine.runner import Batch, build_batch
from lopa.engine.scoring import Row, choose_and_score
from lopa.engine.sequence import Plan
from lopa.model.cache import KVPool
from lopa.model.pooled import pooled_forward
from lopa.model.transformer import Transformer

log = logging.getLogger("lopa.engine")


@dataclass
class SlotView:
    """One sequence's share of a batched forward: what ``Sequence.advance`` calls on a runner."""

    runner: BatchRunner | None  # None for vanilla (nothing to commit)
    slot: int
    row0: int  # first row of this sequence in the forward
    scores: list[float]
    preds: list[Prediction]
    lasts: list[Tensor]  # per candidate: raw logit of the last committed position if this forward commits
    timing: dict[str, float] = field(default_factory=dict)

    def prediction(self, index: int) -> Prediction:
        return self.preds[index]

    def commit(self, index: int, n: int) -> None:
        if self.runner is not None and n:
            self.runner.commit(self.slot, self.row0 + index, n, self.lasts[index])


@dataclass
class BatchRunner:
    """Owns the KV pool and the last forward's window K/V (see the module docstring)."""

    model: Transformer
    max_num_seqs: int
    max_model_len: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    forwards: int = 0

    def __post_init__(self) -> None:
        cfg, p = self.model.config, next(self.model.parameters())
        shape = (cfg.num_hidden_layers, self.max_num_seqs, self.max_model_len, cfg.num_key_value_heads, cfg.head_dim)
        self.pool = KVPool(*shape, p.dtype, p.device)
        log.info(
            "KV pool: %d slots x %d positions = %.1f MiB (%s)",
            self.max_num_seqs,
            self.max_model_len,
            self.pool.memory_bytes() / 2**20,
            p.dtype,
        )
        self.last_logit: list[Tensor | None] = [None] * self.max_num_seqs
        self._win: tuple[Tensor, Tensor] | None = None  # (layers, R, Hkv, W, D) K and V of the last forward

    @property
    def shift(self) -> int:
        """The model's prediction offset (its family's ``logit_shift``): 0 freezes no last logit."""
        return int(self.model.config.logit_shift)

    @property
    def pad_id(self) -> int:
        return self.model.config.padding_id

    # ---- slots ---------------------------------------------------------------------------------------
    def alloc(self) -> int | None:
        slot = self.pool.alloc()
        if slot is not None:
            self.last_logit[slot] = None
        return slot

    def release(self, slot: int) -> None:
        self.pool.release(slot)
        self.last_logit[slot] = None

    def commit(self, slot: int, row: int, n: int, last: Tensor) -> None:
        """Commit the first ``n`` window positions of forward row ``row`` into ``slot``."""
        assert self._win is not None
        k, v = self._win
        self.pool.commit(slot, k[:, row, :, :n], v[:, row, :, :n])
        self.last_logit[slot] = last.clone() if last.numel() else None  # (0,) when the shift is 0

    # ---- the forwards --------------------------------------------------------------------------------
    @torch.inference_mode()
    def verify(self, items: list[tuple[int, Plan, Sampler]]) -> list[SlotView]:
        """One forward over every candidate of every (slot, plan, sampler); one SlotView per item, in order."""
        t0 = time.perf_counter()
        for slot, plan, _ in items:
            if self.pool.committed[slot] != plan.window_start:
                committed = self.pool.committed[slot]
                raise RuntimeError(f"slot {slot}: window starts at {plan.window_start} but the pool holds {committed}")
        batches = [build_batch(p.window_start, p.commit_len, p.cands, self.pad_id, self.shift) for _, p, _ in items]
        ids, positions, valid, idx = _stack(batches, self.pad_id)
        row_slot = torch.tensor([slot for slot, plan, _ in items for _ in plan.cands])  # (R,)
        prefix = torch.tensor([plan.window_start for _, plan, _ in items for _ in plan.cands])  # (R,)
        logits, win_k, win_v = self._forward(ids, positions, valid, idx, row_slot, prefix)
        self._win, self.forwards = (win_k, win_v), self.forwards + 1
        t1 = time.perf_counter()
        views = self._score(items, batches, logits, cached=True)
        return _timed(views, t1 - t0, time.perf_counter() - t1)

    @torch.inference_mode()
    def _forward(
        self, ids: Tensor, positions: Tensor, valid: Tensor | None, idx: Tensor, row_slot: Tensor, prefix: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The batched forward on host inputs: logits (R, n, vocab), window K and V (layers, R, Hkv, W, D)."""
        dev = self.device
        return pooled_forward(
            self.model,
            ids.to(dev),
            positions.to(dev),
            valid.to(dev) if valid is not None else None,
            idx.to(dev),
            self.pool.k,
            self.pool.v,
            row_slot.to(dev),
            prefix.to(dev),
        )

    @torch.inference_mode()
    def verify_uncached(self, items: list[tuple[int, Plan, Sampler]]) -> list[SlotView]:
        """Vanilla sequences: full sequences from position 0, no cache, one forward for all of them."""
        t0 = time.perf_counter()
        batches = [build_batch(0, 0, p.cands, self.pad_id, self.shift) for _, p, _ in items]
        ids, positions, valid, idx = _stack(batches, self.pad_id)
        dev = self.device
        valid = valid.to(dev) if valid is not None else None
        logits = self.model(ids.to(dev), positions.to(dev), None, valid, idx.to(dev))  # (R, n, vocab)
        self.forwards += 1
        t1 = time.perf_counter()
        views = self._score(items, batches, logits, cached=False)
        return _timed(views, t1 - t0, time.perf_counter() - t1)

    def _score(
        self, items: list[tuple[int, Plan, Sampler]], batches: list[Batch], logits: Tensor, cached: bool
    ) -> list[SlotView]:
        """Per candidate: its prediction and branch score (:func:`~lopa.engine.scoring.choose_and_score`: greedy
        rows of one sampler chosen together, sampled rows with their own seeded generator)."""
        rows, start = [], 0
        for (slot, plan, sampler), b in zip(items, batches, strict=True):
            last = self.last_logit[slot] if cached else None
            for i, c in enumerate(plan.cands):
                if b.uses_last[i] and c.predict.numel():
                    assert last is not None, "the first prediction needs the frozen last logit of a committed prefix"
                used = last if b.uses_last[i] else None
                rows.append(Row(c.predict, c.score_mask, c.stream, sampler, plan.iteration, start + i, used))
            start += len(plan.cands)
        preds, scores = choose_and_score(logits, rows)
        views, row = [], 0
        for slot, plan, _ in items:
            k = len(plan.cands)
            m = [c.predict.numel() for c in plan.cands]
            freeze = plan.commit_len and self.shift  # shift 0: no logit to freeze at the commit
            lasts_out = [logits[row + i, m[i]] if freeze else logits.new_zeros(0) for i in range(k)]
            views.append(
                SlotView(self if cached else None, slot, row, scores[row : row + k], preds[row : row + k], lasts_out)
            )
            row += k
        return views


def _stack(batches: list[Batch], pad_id: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Pad per-sequence batches into one: ids, positions, valid (None if nothing is padded), logits_idx."""
    rows = sum(b.ids.shape[0] for b in batches)
    width = max(b.ids.shape[1] for b in batches)
    n = max(b.logits_idx.shape[1] for b in batches)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)  # (R, W)
    positions = torch.zeros(rows, width, dtype=torch.long)  # (R, W)
    valid = torch.zeros(rows, width, dtype=torch.bool)  # (R, W)
    idx = torch.zeros(rows, n, dtype=torch.long)  # (R, n)
    r = 0
    for b in batches:
        k, length = b.ids.shape
        ids[r : r + k, :length] = b.ids
        start = int(b.positions[0, 0])
        positions[r : r + k] = start + torch.arange(width)
        valid[r : r + k, :length] = True if b.valid is None else b.valid
        idx[r : r + k, : b.logits_idx.shape[1]] = b.logits_idx
        r += k
    return ids, positions, None if bool(valid.all()) else valid, idx


def _timed(views: list[SlotView], forward: float, scoring: float) -> list[SlotView]:
    for v in views:
        v.timing = {"forward": forward, "scoring": scoring}
    return views
