"""Continuous batching: sequences join and leave a running batch between iterations.

:class:`Scheduler` keeps a FIFO of waiting sequences and the running ones (at most ``max_num_seqs``, one KV
pool slot each). Every :meth:`step` first admits waiting sequences into free slots (in order of arrival;
when the pool is full they wait, nothing is allocated on the fly), then asks every running sequence for its
plan and runs ONE batched forward over all block-decoder plans (plus one cache-less forward for vanilla
sequences, which run as a batch of their own), and hands each sequence its own scores and predictions to
advance. A sequence whose plan is None has finished: its final Step is returned and its slot freed at once,
as is the slot of a sequence that finishes inside the iteration or is aborted. Each sequence's ``forwards``
counts only the forwards it took part in, so its TPF compares with decoding it alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from lopa.config import DecodeConfig
from lopa.engine.batch import BatchRunner, SlotView
from lopa.engine.block_layout import layout_block
from lopa.engine.sequence import BlockSequence, Plan, Step, StopCheck, VanillaSequence, new_sequence
from lopa.errors import PromptTooLongError


@dataclass
class Entry:
    rid: Hashable
    seq: BlockSequence | VanillaSequence
    slot: int = -1
    sizes: list[int] = field(default_factory=list)  # sequences in each forward it took part in
    timing: dict[str, float] = field(default_factory=dict)  # seconds per phase, summed over its forwards


class Scheduler:
    """Waiting queue + running batch over one :class:`BatchRunner` (see the module docstring)."""

    def __init__(self, runner: BatchRunner, mask_id: int, end_ids: frozenset[int]) -> None:
        self.runner, self.mask_id, self.end_ids = runner, mask_id, end_ids
        self.max_num_seqs = runner.max_num_seqs
        self.waiting: deque[Entry] = deque()
        self.running: list[Entry] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, rid: Hashable, prompt: list[int], cfg: DecodeConfig, stop: StopCheck | None = None) -> None:
        """Queue a sequence; it joins the batch at a later :meth:`step` when a slot is free."""
        seq = new_sequence(prompt, cfg, self.mask_id, self.end_ids, stop, layout_block(self.runner.model.config, cfg))
        if seq.max_len > self.runner.max_model_len:
            raise PromptTooLongError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({cfg.max_new_tokens}) = {seq.max_len} exceeds "
                f"the engine's max_model_len of {self.runner.max_model_len}; shorten the prompt or lower "
                "max_new_tokens"
            )
        self.waiting.append(Entry(rid, seq))

    def abort(self, rid: Hashable) -> bool:
        """Drop a waiting or running sequence; its slot is free for the next step. False if unknown."""
        for e in self.waiting:
            if e.rid == rid:
                self.waiting.remove(e)
                return True
        for e in self.running:
            if e.rid == rid:
                self._retire(e)
                return True
        return False

    def step(self) -> list[tuple[Hashable, Step]]:
        """Admit, run one iteration of every running sequence, retire finished ones; (rid, Step) per sequence."""
        self._admit()
        out: list[tuple[Hashable, Step]] = []
        cached: list[tuple[Entry, Plan]] = []
        uncached: list[tuple[Entry, Plan]] = []
        for e in list(self.running):
            plan = e.seq.plan()
            if plan is None:
                assert e.seq.final is not None
                out.append((e.rid, self._finished(e, e.seq.final)))
                continue
            (cached if e.seq.uses_cache else uncached).append((e, plan))
        for group, verify in ((cached, self.runner.verify), (uncached, self.runner.verify_uncached)):
            if not group:
                continue
            views = verify([(e.slot, plan, e.seq.sampler) for e, plan in group])
            for (e, plan), view in zip(group, views, strict=True):
                step = e.seq.advance(plan, view.scores, self._account(e, view, len(group)))
                out.append((e.rid, self._finished(e, step) if step.done else step))
        return out

    # ---- internals -----------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            e = self.waiting[0]
            if e.seq.uses_cache:
                slot = self.runner.alloc()
                if slot is None:
                    return
                e.slot = slot
            self.running.append(self.waiting.popleft())

    def _account(self, e: Entry, view: SlotView, size: int) -> SlotView:
        e.sizes.append(size)
        for phase, seconds in view.timing.items():
            e.timing[phase] = e.timing.get(phase, 0.0) + seconds
        view.timing = dict(e.timing)
        return view

    def _finished(self, e: Entry, step: Step) -> Step:
        step.stats.batch_size = sum(e.sizes) / len(e.sizes) if e.sizes else 1.0
        self._retire(e)
        return step

    def _retire(self, e: Entry) -> None:
        self.running.remove(e)
        if e.slot >= 0:
            self.runner.release(e.slot)
            e.slot = -1
