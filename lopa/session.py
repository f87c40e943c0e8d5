"""Sessions: many prompts in flight at once, each streamed as final text (what ``LLM.generate`` and the server
drive).

A session takes prompts with :meth:`add` (each gets an id), and every :meth:`step` advances all of them by one
iteration and returns a :class:`StreamEvent` per sequence that moved; the last event of a sequence carries its
Completion. :meth:`cancel` drops a sequence at once (its KV slot is free for the next step).

- :class:`BatchSession` runs the sequences through the continuous-batching scheduler: one forward per step for
  all of them (``engine/scheduler.py``).
- :class:`IteratorSession` runs per-prompt ``stream`` iterators round-robin, ``max_active`` at a time; used
  when a runner cannot batch (branch-parallel decoding runs one sequence at a time).

:class:`TextStream` turns one sequence's Steps into StreamEvents: text is never revised (only the contiguous
decoded prefix of the answer is shown), an incomplete multi-byte character is held back, and so is the tail
that could still turn into a stop string. With ``DecodeConfig.trace`` each event also carries the trace steps
recorded since the previous event (the per-step hook for live views).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lopa.config import DecodeConfig
from lopa.engine.sequence import Step
from lopa.outputs import Completion, TraceStep

if TYPE_CHECKING:
    from lopa.engine.scheduler import Scheduler
    from lopa.llm import LLM


@dataclass
class StreamEvent:
    """Text that became final since the previous event ('' if none); ``completion`` on the last event.

    With ``DecodeConfig.trace`` on, ``trace`` holds the trace steps recorded since the previous event (one per
    forward), so a client can show the decoding live; it is empty otherwise.
    """

    text: str
    token_ids: list[int]
    completion: Completion | None = None
    trace: list[TraceStep] = field(default_factory=list)


class TextStream:
    """One sequence's Steps → StreamEvents (see the module docstring)."""

    def __init__(self, llm: LLM, ids: list[int], cfg: DecodeConfig) -> None:
        self.llm, self.ids, self.cfg = llm, ids, cfg
        self.t0 = time.perf_counter()
        self.shown_text, self.shown_ids = "", 0
        self.hold = max((len(s) for s in cfg.stop), default=1) - 1
        self.traced = 0  # trace records already handed out (one per forward)

    def feed(self, step: Step) -> StreamEvent:
        cfg = self.cfg
        completion = None
        if step.done:
            completion = self.llm._completion(step, cfg, self.ids, time.perf_counter() - self.t0)
            out_ids, text = completion.token_ids, completion.text
        else:
            out_ids, text, _, _ = self.llm._answer(step, cfg)
            text = text.rstrip("\ufffd")  # an incomplete multi-byte character may still change
            text = text[: max(len(text) - self.hold, len(self.shown_text))] if cfg.stop else text
        delta = text[len(self.shown_text) :] if text.startswith(self.shown_text) else ""
        self.shown_text += delta
        new_ids = out_ids[self.shown_ids :]
        self.shown_ids = max(self.shown_ids, len(out_ids))
        steps = step.trace[self.traced :] if step.trace is not None else []
        self.traced += len(steps)
        return StreamEvent(delta, new_ids, completion, steps)


class BatchSession:
    """Prompts decoded together by the LLM's scheduler: one batched forward per :meth:`step`."""

    def __init__(self, llm: LLM, scheduler: Scheduler) -> None:
        self.llm, self.scheduler = llm, scheduler
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
        self.scheduler.add(rid, ids, cfg, llm._stop_check(cfg) if cfg.stop else None)
        self._streams[rid] = TextStream(llm, ids, cfg)
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
