"""The engine worker: the one thread that calls the LLM, its bounded job queue, continuous batching, cancellation.

``LLM`` is not thread-safe and a forward takes from milliseconds to seconds, so the HTTP event loop never calls it: a
route wraps each request in a :class:`~lopa.server.jobs.Job`, :meth:`EngineWorker.submit` queues it (or raises
:class:`~lopa.server.jobs.QueueFullError` when its prompts would take the waiting prompts over ``queue_limit``), and the
worker thread runs an engine session (``llm.open_session()``, see ``lopa/engine/session.py``): between two iterations
it admits waiting prompts while the engine has room, then runs ONE iteration for all running sequences and routes each
sequence's event to its job. Admission is fair by prompt, not by request: the jobs with prompts still waiting take
turns (round-robin), one prompt each per turn, so a request carrying many prompts gets one slot per round and a
one-prompt request that arrives behind it waits for at most one of its prompts per free slot, not for all of them.
Results travel back as the items of :mod:`lopa.server.jobs` on the job's asyncio queue (``loop.call_soon_threadsafe``),
always ending with ``Closed``. Setting ``job.cancel`` (client gone) drops the job's sequences before the next
iteration, so its KV slots are free within one forward; its prompts still waiting are dropped without touching the
engine. Every request, streamed or not, goes through the same session events, so both paths cancel alike and see the
same engine output.

Per-request hooks: :class:`_Active` is the one place a job's per-sequence events arrive (``_deliver``), so
per-step extras (traces, timings) can be routed to a job from there.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lopa.errors import LimitExceededError, LopaError
from lopa.server.jobs import Closed, Delta, Failed, Finished, Job, QueueFullError, Started, Trace
from lopa.server.output_cut import OutputCutter
from lopa.server.protocol import usage_dict

if TYPE_CHECKING:  # the worker only calls methods; importing lopa.LLM here would load torch for nothing
    from lopa.engine.protocol import Engine, Session

log = logging.getLogger("lopa.server")


class MetricsHook:
    """What the worker thread reports for ``GET /metrics``; no-ops here (``server/metrics.py`` records them)."""

    def iteration_done(self, seconds: float) -> None:
        """One engine iteration (one batched forward) took ``seconds``."""

    def first_token(self, seconds: float) -> None:
        """A sequence's first final token came ``seconds`` after its request arrived."""

    def sequence_finished(self, reason: str, usage: dict) -> None:
        """A sequence finished with ``reason`` ("stop" / "length") and its response's ``usage``."""


@dataclass
class _Active:
    """A job the worker has taken: which session sequence is which of its prompts, their output cutters, and
    how many of its prompts are in the engine so far (the rest wait for their turn)."""

    job: Job
    prompts: dict[int, int]  # session sequence id -> prompt index, for the prompts in the engine
    cutters: dict[int, OutputCutter]
    start: float = field(default_factory=time.perf_counter)
    started: bool = False
    admitted: int = 0  # prompts handed to the engine (job.prompts[:admitted])
    first_token: set[int] = field(default_factory=set)  # sequences that have shown a final token

    @property
    def unadmitted(self) -> int:
        return len(self.job.prompts) - self.admitted


class EngineWorker:
    """Owns the LLM: one daemon thread admits waiting prompts into the running batch, round-robin over jobs."""

    def __init__(self, llm: Engine, queue_limit: int) -> None:
        self.llm = llm
        self.queue_limit = queue_limit  # prompts that may wait for the engine
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # prompts submitted and not yet in the engine
        self._mean_seconds = 1.0  # running mean of job durations, for Retry-After
        self.completed = 0  # jobs that ran to the end
        self.failed = 0  # jobs that ended with an error (the client's, 4xx, or a bug, 5xx)
        self.cancelled = 0  # jobs dropped or stopped early because their client went away
        self._active: dict[int, _Active] = {}  # session sequence id -> its job (worker thread only)
        self._live: dict[int, _Active] = {}  # id(job) -> every job taken and not yet closed (worker thread only)
        self._turns: deque[_Active] = deque()  # jobs with prompts still waiting, in turn order (worker thread only)
        self._running = 0  # jobs with a prompt in the engine, not yet closed (read by /health from the event loop)
        self._stopping = threading.Event()  # set by stop(): the worker cancels its running jobs
        self._thread: threading.Thread | None = None
        self._session: Any = None
        self.metrics = MetricsHook()  # replaced by server/metrics.py's Prometheus recorder

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._session = self._open_session()  # allocates the KV pool now, so its size is logged at start
            self._thread = threading.Thread(target=self._loop, name="lopa-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running jobs, drop queued ones, and join the thread."""
        self._stopping.set()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def session(self) -> Any:
        """The engine session (None before :meth:`start`); read-only outside the worker thread."""
        return self._session

    @property
    def waiting(self) -> int:
        """Prompts submitted and not yet in the engine."""
        return self._waiting

    @property
    def running(self) -> int:
        """Jobs whose sequences are in the engine."""
        return self._running

    def retry_after(self) -> int:
        """Seconds a rejected client should wait: the queue's expected drain time, 1 to 60."""
        slots = max(1, self.llm.engine_config.max_num_seqs or 1) if self.llm.can_batch else 1
        return max(1, min(60, math.ceil(self._mean_seconds * (self._waiting + 1) / slots)))

    # ---- submission (event-loop thread) -------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; QueueFullError when its prompts would take the waiting prompts over ``queue_limit``."""
        n = len(job.prompts)
        if n > self.queue_limit:
            raise LimitExceededError(
                f"this request carries {n} prompts, more than this server's queue holds ({self.queue_limit}, "
                f"lopa serve --queue-limit); send fewer prompts per request"
            )
        with self._lock:
            if self._waiting + n > self.queue_limit:
                raise QueueFullError(self.retry_after())
            self._waiting += n
        self._jobs.put(job)

    # ---- the worker thread --------------------------------------------------------------------------------
    def _open_session(self) -> Session:
        """The engine's session (batched, or one sequence at a time: see ``Engine.open_session``)."""
        return self.llm.open_session()

    def _loop(self) -> None:
        session = self._session
        while True:
            if not self._take_jobs(block=not session.has_work and not self._turns):
                self._shutdown(session)
                return
            self._admit_turns(session)
            for active in list(self._live.values()):
                if active.job.cancel.is_set() or self._stopping.is_set():
                    self._close(session, active, cancelled=True)
            if not session.has_work:
                continue
            try:
                t0 = time.perf_counter()
                events = session.step()
                self.metrics.iteration_done(time.perf_counter() - t0)
            except Exception as e:  # a bug: every running job gets a 500, the server keeps serving
                log.exception("generation failed")
                for active in {id(a.job): a for a in self._active.values()}.values():
                    active.job.push(Failed(e))
                    self._close(session, active, failed=True)
                continue
            for rid, event in events:
                active = self._active.get(rid)
                if active is not None:
                    self._deliver(session, active, rid, event)

    def _take_jobs(self, block: bool) -> bool:
        """Move submitted jobs to the back of the turn order (waiting for one if ``block``); False on shutdown."""
        while True:
            try:
                job = self._jobs.get(block=block)
            except queue.Empty:
                return True
            block = False
            if job is None:
                return False
            active = _Active(job, {}, {})
            self._live[id(job)] = active
            self._turns.append(active)

    def _admit_turns(self, session: Any) -> None:
        """While the engine has room, give the next job in turn one prompt's slot (round-robin by prompt)."""
        while self._turns and (session.capacity > 0 or not session.has_work):
            active = self._turns.popleft()
            if active.job.cancel.is_set() or self._stopping.is_set():
                self._close(session, active, cancelled=True)
                continue
            if self._admit_one(session, active) and active.unadmitted:
                self._turns.append(active)

    def _admit_one(self, session: Any, active: _Active) -> bool:
        """Hand the job's next prompt to the engine; False when that failed the job."""
        job, index = active.job, active.admitted
        with self._lock:
            self._waiting -= 1
        active.admitted += 1
        if index == 0:
            self._running += 1
        try:
            rid = session.add(job.prompts[index], job.config, raw=job.raw)
        except LopaError as e:  # this request's fault (a prompt too long, ...): only it fails
            job.push(Failed(e))
            self._close(session, active, failed=True)
            return False
        active.prompts[rid] = index
        active.cutters[rid] = OutputCutter(self.llm.tokenizer, job.max_tokens)
        self._active[rid] = active
        return True

    def _deliver(self, session: Any, active: _Active, rid: int, event: Any) -> None:
        """One sequence's event of this iteration, routed to its job."""
        job = active.job
        if isinstance(event, Exception):
            if not isinstance(event, LopaError):
                log.error("generation failed", exc_info=event)
            job.push(Failed(event))
            self._close(session, active, failed=True)
            return
        if not active.started:
            active.started = True
            job.push(Started())
        if event.token_ids and rid not in active.first_token:
            active.first_token.add(rid)
            self.metrics.first_token(time.perf_counter() - job.arrived)
        cutter = active.cutters[rid]
        delta = cutter.feed(event.text, list(event.token_ids))
        if job.stream and delta:
            job.push(Delta(active.prompts[rid], delta))
        if event.trace:  # the live trace stream (server/trace.py); empty unless config.trace
            job.push(Trace(active.prompts[rid], list(event.trace)))
        completion = event.completion
        if completion is None:
            return
        text, reason, n_tokens = cutter.finish(completion)
        if job.stream:
            text = cutter.emitted  # what the client was actually sent
        stats = completion.stats
        prompt_tokens = stats.prompt_tokens or len(completion.prompt_token_ids)
        usage = usage_dict(prompt_tokens, n_tokens, stats.forwards, stats.tpf)
        self.metrics.sequence_finished(reason, usage)
        job.push(Finished(active.prompts[rid], text, reason, usage))
        del self._active[rid]
        del active.prompts[rid]
        if not active.prompts and not active.unadmitted:
            self._close(session, active)

    def _close(self, session: Any, active: _Active, cancelled: bool = False, failed: bool = False) -> None:
        """Drop the job's sequences (their slots are free for the next iteration) and waiting prompts; close it."""
        if self._live.pop(id(active.job), None) is None:
            return  # already closed
        if active.admitted:  # it counted as running from its first prompt's admission
            self._running -= 1
        for rid in list(active.prompts):
            session.cancel(rid)
            self._active.pop(rid, None)
        active.prompts.clear()
        if active.unadmitted:
            with self._lock:
                self._waiting -= active.unadmitted
            active.admitted = len(active.job.prompts)
        with contextlib.suppress(ValueError):
            self._turns.remove(active)
        if cancelled:
            self.cancelled += 1
        elif failed:
            self.failed += 1
        else:
            self.completed += 1
        self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.perf_counter() - active.start)
        active.job.push(Closed())

    def _shutdown(self, session: Any) -> None:
        for active in list(self._live.values()):
            self._close(session, active, cancelled=True)
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.push(Failed(QueueFullError(1)))
                job.push(Closed())
