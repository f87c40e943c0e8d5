"""What travels between a request's coroutine and the engine worker thread: the :class:`Job` (prompts, decode
settings, the asyncio queue its results arrive on, the cancel flag) and the items put on that queue.

A job's queue carries :class:`Started`, then :class:`Delta` (streamed text), :class:`Trace` (trace steps, only
when the config traces) and one :class:`Finished` per prompt, or :class:`Failed`; :class:`Closed` always comes
last. :class:`QueueFullError` is what :meth:`~lopa.server.worker.EngineWorker.submit` raises when the queue is
full (a 503 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lopa import DecodeConfig


class QueueFullError(Exception):
    """The waiting prompts would exceed ``queue_limit``; the client should retry later."""

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
    steps: list[Any]  # lopa.engine.output.TraceStep, one per forward


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
    """One HTTP request's work: its prompts join the running batch together, with one config."""

    prompts: list[Any]  # each: text, token ids, or a list of chat messages
    config: DecodeConfig
    raw: bool  # text prompts bypass the chat template (/v1/completions)
    max_tokens: int | None  # cut every output to this many tokens; None: no cut
    stream: bool  # push Delta items as text becomes final
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)  # for time to first token

    def push(self, item: object) -> None:
        """Hand an item to the request's coroutine (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel.set()
