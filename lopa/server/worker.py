"""The engine worker: the one thread that calls the LLM, its bounded job queue, and cancellation.

``LLM`` is not thread-safe and a forward takes from milliseconds to seconds, so the HTTP event loop never
calls it: ``app.py`` wraps each request in a :class:`Job`, :meth:`EngineWorker.submit` queues it (or raises
:class:`QueueFullError` when ``queue_limit`` requests already wait), and the worker thread runs jobs one at a
time through ``llm.stream``. Results travel back as :class:`Started` / :class:`Delta` / :class:`Finished` /
:class:`Failed` items on the job's asyncio queue (``loop.call_soon_threadsafe``), always ending with
:class:`Closed`. Setting ``job.cancel`` (client gone) stops the job between two decoding iterations and closes
the LLM's iterator, so the worker is free again within one forward; a job cancelled while still queued is
dropped without touching the engine. Every request, streamed or not, goes through ``llm.stream`` so both
paths cancel alike and see the same engine output.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lopa.errors import LopaError
from lopa.outputs import Completion
from lopa.server.protocol import usage_dict

if TYPE_CHECKING:  # the worker only calls methods; importing lopa.LLM here would load torch for nothing
    from lopa import LLM, DecodeConfig

log = logging.getLogger("lopa.server")


class QueueFullError(Exception):
    """The job queue holds ``queue_limit`` waiting requests; the client should retry later."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy ({retry_after}s estimated wait); retry later")
        self.retry_after = retry_after


@dataclass
class Started:
    """The engine accepted the request (its first decoding iteration ran without error)."""


@dataclass
class Delta:
    index: int  # which prompt of the request
    text: str  # newly final text, never revised later


@dataclass
class Trace:
    """Trace steps recorded since the previous item (only for jobs whose config has ``trace`` on)."""

    index: int
    steps: list[Any]  # lopa.outputs.TraceStep, one per forward


@dataclass
class Finished:
    index: int
    text: str  # the whole output of this prompt (after the max_tokens cut)
    finish_reason: str  # "stop" | "length"
    usage: dict


@dataclass
class Failed:
    error: Exception  # a LopaError is the client's fault (4xx); anything else is a server bug


@dataclass
class Closed:
    """Always the last item of a job."""


@dataclass
class Job:
    """One HTTP request's work: its prompts run one after another with one config."""

    prompts: list[Any]  # each: text, token ids, or a list of chat messages
    config: DecodeConfig
    raw: bool  # text prompts bypass the chat template (/v1/completions)
    max_tokens: int | None  # cut every output to this many tokens; None: no cut
    stream: bool  # push Delta items as text becomes final
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def push(self, item: object) -> None:
        """Hand an item to the request's coroutine (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel.set()


class OutputCutter:
    """Applies the ``max_tokens`` cut to one prompt's output, incrementally and without revising text.

    Block decoders generate whole blocks, so ``max_new_tokens`` is ``max_tokens`` rounded up and the output is
    cut back here: the final text is the engine's text (which already honours stop strings and end tokens)
    truncated to the length of ``decode(token_ids[:max_tokens])``. Streaming and non-streaming apply the same
    rule, so their texts agree.
    """

    def __init__(self, tokenizer: Any, max_tokens: int | None) -> None:
        self._tokenizer = tokenizer
        self._max_tokens = max_tokens
        self._text = ""  # the engine's final text so far
        self._ids: list[int] = []
        self._limit: int | None = None  # characters allowed once the token cut is known
        self.emitted = ""

    def _limit_for(self, ids: list[int]) -> int | None:
        if self._max_tokens is None or len(ids) <= self._max_tokens:
            return None
        return len(self._tokenizer.decode(list(ids[: self._max_tokens])))

    def feed(self, text: str, token_ids: list[int]) -> str:
        """Take one stream event's new text and ids; return the text that may be shown now."""
        self._text += text
        self._ids.extend(token_ids)
        if self._limit is None:
            self._limit = self._limit_for(self._ids)
        end = len(self._text) if self._limit is None else min(len(self._text), self._limit)
        delta = self._text[len(self.emitted) : end]
        self.emitted += delta
        return delta

    def finish(self, completion: Completion) -> tuple[str, str, int]:
        """(text, finish_reason, completion_tokens) of the finished output, cut like the stream."""
        ids = completion.token_ids
        limit = self._limit_for(ids)
        if limit is None or len(completion.text) <= limit:
            text, reason = completion.text, completion.finish_reason
        else:
            text, reason = completion.text[:limit], "length"
        n_tokens = len(ids) if self._max_tokens is None else min(len(ids), self._max_tokens)
        return text, reason, n_tokens


class EngineWorker:
    """Owns the LLM: one daemon thread runs queued jobs in arrival order."""

    def __init__(self, llm: LLM, queue_limit: int) -> None:
        self.llm = llm
        self.queue_limit = queue_limit
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._mean_seconds = 1.0  # running mean of job durations, for Retry-After
        self.completed = 0  # jobs that ran to the end
        self.failed = 0  # jobs that ended with an error (the client's, 4xx, or a bug, 5xx)
        self.cancelled = 0  # jobs dropped or stopped early because their client went away
        self._current: Job | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lopa-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job, drop queued ones, and join the thread."""
        current = self._current
        if current is not None:
            current.cancel.set()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    def retry_after(self) -> int:
        """Seconds a rejected client should wait: the queue's expected drain time, 1 to 60."""
        return max(1, min(60, math.ceil(self._mean_seconds * (self._waiting + 1))))

    # ---- submission (event-loop thread) -------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._lock:
            if self._waiting >= self.queue_limit:
                raise QueueFullError(self.retry_after())
            self._waiting += 1
        self._jobs.put(job)

    # ---- the worker thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._drain()
                return
            with self._lock:
                self._waiting -= 1
            if job.cancel.is_set():
                self.cancelled += 1
                job.push(Closed())
                continue
            self._running, self._current = 1, job
            start, stopped_early, failed = time.perf_counter(), False, True
            try:
                stopped_early = not self._run(job)
                failed = False
            except LopaError as e:
                job.push(Failed(e))
            except Exception as e:  # a bug: report it as a 500 and keep serving
                log.exception("generation failed")
                job.push(Failed(e))
            finally:
                self._running, self._current = 0, None
                if stopped_early:
                    self.cancelled += 1
                elif failed:
                    self.failed += 1
                else:
                    self.completed += 1
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.perf_counter() - start)
                job.push(Closed())

    def _drain(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.push(Failed(QueueFullError(1)))
                job.push(Closed())

    def _run(self, job: Job) -> bool:
        """Run every prompt of ``job``; False when it stopped early because it was cancelled."""
        started = False
        for index, prompt in enumerate(job.prompts):
            cutter = OutputCutter(self.llm.tokenizer, job.max_tokens)
            events = self.llm.stream(prompt, job.config, raw=job.raw)
            completion: Completion | None = None
            try:
                for event in events:
                    if job.cancel.is_set():
                        return False
                    if not started:
                        started = True
                        job.push(Started())
                    delta = cutter.feed(event.text, list(event.token_ids))
                    if job.stream and delta:
                        job.push(Delta(index, delta))
                    if event.trace:  # the live trace stream (server/trace.py); empty unless config.trace
                        job.push(Trace(index, list(event.trace)))
                    if event.completion is not None:
                        completion = event.completion
            finally:
                close = getattr(events, "close", None)
                if close is not None:
                    close()  # stops the engine within one forward when we leave early
            if completion is None:
                raise RuntimeError("llm.stream ended without a final completion")
            text, reason, n_tokens = cutter.finish(completion)
            if job.stream:
                text = cutter.emitted  # what the client was actually sent
            stats = completion.stats
            prompt_tokens = stats.prompt_tokens or len(completion.prompt_token_ids)
            usage = usage_dict(prompt_tokens, n_tokens, stats.forwards, stats.tpf)
            job.push(Finished(index, text, reason, usage))
        return True
