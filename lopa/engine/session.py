"""Sessions: many prompts in flight at once, each streamed as final text (what ``LLM.generate`` and the server
drive).

A session takes prompts with :meth:`add` (each gets an id), and every :meth:`step` advances all of them by one
iteration and returns a :class:`StreamEvent` per sequence that moved; the last event of a sequence carries its
Completion. :meth:`cancel` drops a sequence at once (its KV slot is free for the next step).

- :class:`BatchSession` runs the sequences through the continuous-batching scheduler: one forward per step for
  all of them (``engine/scheduler.py``).
- :class:`IteratorSession` runs per-prompt ``stream`` iterators round-robin, ``max_active`` at a time; used
  when a runner cannot batch (branch-parallel decoding runs one sequence at a time).

Text assembly (:class:`~lopa.engine.output.TextStream`) lives in ``engine/output.py``; a session only drives
the sequences.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from lopa.config import DecodeConfig
from lopa.engine.output import StreamEvent, TextOutput, TextStream

if TYPE_CHECKING:
    from lopa.engine.protocol import Engine
    from lopa.engine.scheduler import Scheduler

__all__ = ["BatchSession", "IteratorSession", "StreamEvent"]


class BatchSession:
    """Prompts decoded together by an engine's scheduler: one batched forward per :meth:`step`. ``llm`` encodes
    and checks the prompts, ``output`` turns each sequence's Steps into text."""

    def __init__(self, llm: Engine, scheduler: Scheduler, output: TextOutput) -> None:
        self.llm, self.scheduler, self.output = llm, scheduler, output
        self._streams: dict[int, TextStream] = {}
        self._ids = itertools.count()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def capacity(self) -> int:
        """Sequences the engine could still take without queueing them."""
        s = self.scheduler
        return max(0, s.max_num_seqs - len(s.running) - len(s.waiting))

    def add(self, prompt: Any, config: DecodeConfig | None = None, raw: bool = False) -> int:
        """Queue a prompt; raises ConfigError / PromptTooLongError at once, before it touches the batch."""
        llm = self.llm
        cfg = (config or llm.default_config).validate()
        ids = llm.encode_prompt(prompt, raw)
        llm.check_fits(ids, cfg)
        rid = next(self._ids)
        self.scheduler.add(rid, ids, cfg, self.output.stop_check(cfg))
        self._streams[rid] = TextStream(self.output, ids, cfg)
        return rid

    def step(self) -> list[tuple[int, StreamEvent | Exception]]:
        """One event per sequence that ran (or finished). An exception raised by the batched forward is an engine
        bug and fails the step; one raised while turning a sequence's tokens into text fails that sequence alone
        (it is dropped and its exception is its event), the others go on."""
        out: list[tuple[int, StreamEvent | Exception]] = []
        for rid, step in self.scheduler.step():
            stream = self._streams[rid]
            try:
                event: StreamEvent | Exception = stream.feed(step)
            except Exception as e:
                self.cancel(rid)
                out.append((rid, e))
                continue
            if step.done:
                del self._streams[rid]
            out.append((rid, event))
        return out

    def cancel(self, rid: int) -> None:
        self.scheduler.abort(rid)
        self._streams.pop(rid, None)


class IteratorSession:
    """Per-prompt stream iterators, ``max_active`` advanced per step in turn, the rest waiting in order."""

    def __init__(self, stream: Callable[..., Iterator[StreamEvent]], max_active: int = 1) -> None:
        self._stream, self.max_active = stream, max_active
        self._waiting: deque[tuple[int, Any, DecodeConfig | None, bool]] = deque()
        self._active: dict[int, Iterator[StreamEvent]] = {}
        self._ids = itertools.count()

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._active)

    @property
    def capacity(self) -> int:
        return max(0, self.max_active - len(self._active) - len(self._waiting))

    def add(self, prompt: Any, config: DecodeConfig | None = None, raw: bool = False) -> int:
        rid = next(self._ids)
        self._waiting.append((rid, prompt, config, raw))
        return rid

    def step(self) -> list[tuple[int, StreamEvent | Exception]]:
        """One event per active stream; a stream that raised gives its exception instead (and is dropped)."""
        while self._waiting and len(self._active) < self.max_active:
            rid, prompt, config, raw = self._waiting.popleft()
            self._active[rid] = self._stream(prompt, config, raw=raw)
        out: list[tuple[int, StreamEvent | Exception]] = []
        for rid, it in list(self._active.items()):
            try:
                event = next(it)
            except StopIteration:
                del self._active[rid]
                continue
            except Exception as e:  # this prompt failed (a LopaError is the caller's fault): the others go on
                self.cancel(rid)
                out.append((rid, e))
                continue
            out.append((rid, event))
            if event.completion is not None:
                self.cancel(rid)
        return out

    def cancel(self, rid: int) -> None:
        it = self._active.pop(rid, None)
        if it is not None:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        self._waiting = deque(w for w in self._waiting if w[0] != rid)
