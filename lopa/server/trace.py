"""The live trace stream (``POST /v1/trace``) and the page that shows it (``GET /``, ``/static/*``).

A trace request is a completions request for ONE prompt (``prompt``, raw like ``/v1/completions``) or one
conversation (``messages``, through the chat template like ``/v1/chat/completions``), decoded with
``DecodeConfig.trace`` on. The answer is a stream of named Server-Sent Events (docs/serve.md, "Trace stream"):
``start`` (settings, prompt length, answer positions), one ``step`` per forward (positions filled, with the
lookahead fill marked, every candidate's score and the winner, seconds since decoding started), then ``done``
(final text, usage, the text each answer position contributes) or ``error``. Positions are answer positions:
0 is the first generated position.

The job runs on the engine worker like every other request (the worker forwards the ``Trace`` items that
``LLM.stream`` yields); this module only validates, converts trace steps to JSON and frames them. Invalid
requests are plain 4xx JSON answers before the stream starts, exactly as for the OpenAI routes. The page
(``static/``: index.html, app.js, style.css; no build step, no network) is served from the package.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    model_validator,
)

from lopa import DecodeConfig
from lopa.config import BASES, CONFIDENCES, DECODERS
from lopa.engine.block_layout import layout_block
from lopa.errors import DistributedError, LopaError
from lopa.outputs import TraceStep
from lopa.server.handlers import ModelNotFoundError
from lopa.server.limits import ServerLimits, check_request
from lopa.server.openapi import TRACE_RESPONSES
from lopa.server.params import decode_config_for
from lopa.server.protocol import ChatMessage, InvalidFieldError, error_body, new_id, reject_invalid_text
from lopa.server.sse import JobStreamResponse
from lopa.server.worker import Closed, EngineWorker, Failed, Finished, Job, Trace

if TYPE_CHECKING:
    from lopa import LLM

STATIC_DIR = Path(__file__).parent / "static"


_TRACE_PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        {"type": "null"},
    ],
    "description": "a non-empty text or a non-empty list of token ids",
}


class TraceRequest(BaseModel):
    """``POST /v1/trace``: one prompt or one conversation, with the completions API's decoding fields."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    prompt: Annotated[StrictStr | list[StrictInt] | None, WithJsonSchema(_TRACE_PROMPT_SCHEMA)] = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0)
    seed: StrictInt | None = Field(default=None, ge=0)
    stop: StrictStr | list[StrictStr] | None = None
    lopa: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        return reject_invalid_text(data)

    @model_validator(mode="after")
    def _one_prompt(self) -> TraceRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidFieldError("give exactly one of 'prompt' (raw text or token ids) and 'messages'")
        if self.prompt is not None and len(self.prompt) == 0:
            raise InvalidFieldError("'prompt' must not be empty")
        if self.messages is not None and not self.messages:
            raise InvalidFieldError("'messages' must not be empty")
        if isinstance(self.prompt, list) and any(t < 0 for t in self.prompt):
            raise InvalidFieldError("token ids in 'prompt' must be >= 0")
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise InvalidFieldError(f"'stop' takes at most 16 strings, got {len(self.stop)}")
        return self

    def stop_strings(self) -> tuple[str, ...] | None:
        if self.stop is None:
            return None
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class TraceStreamResponse(JobStreamResponse):
    """``text/event-stream`` of named events (start, step, done / error)."""

    def __init__(self, events: AsyncIterator[tuple[str, dict]], job: Job) -> None:
        super().__init__(_frame(events), job)


async def _frame(events: AsyncIterator[tuple[str, dict]]) -> AsyncIterator[str]:
    async for name, data in events:
        yield f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


class StepConverter:
    """TraceStep → the JSON of a ``step`` event, in answer positions; remembers every token it has seen."""

    def __init__(self, llm: LLM, prompt_len: int) -> None:
        self._decode = llm.tokenizer.decode
        self._end_ids = llm.end_ids
        self.prompt_len = prompt_len
        self.tokens: dict[int, int] = {}  # answer position -> token id, as filled so far

    def _text(self, token: int) -> str:
        return self._decode([token], skip_special_tokens=False) if token in self._end_ids else self._decode([token])

    def step(self, s: TraceStep) -> dict[str, Any]:
        filled = []
        for position, token, lookahead in s.fills():
            pos = position - self.prompt_len
            self.tokens[pos] = token
            end = token in self._end_ids
            filled.append(
                {"position": pos, "token": token, "text": self._text(token), "lookahead": lookahead, "end": end}
            )
        candidates = []
        for c in s.candidates:
            extra = c.get("extra_position", -1) >= 0
            token = c.get("extra_token", -1)
            candidates.append(
                {
                    "kind": c["kind"],
                    "position": c["extra_position"] - self.prompt_len if extra else None,
                    "token": token if extra else None,
                    "text": self._text(token) if extra and token >= 0 else None,
                    "confidence": round(float(c.get("extra_conf", 0.0)), 6) if extra else None,
                    "score": round(float(c["score"]), 6),
                }
            )
        return {
            "forward": s.iteration,
            "seconds": round(s.seconds, 6),
            "filled": filled,
            "candidates": candidates,
            "winner": s.winner,
            "committed": max(0, s.committed - self.prompt_len),
        }

    def answer_ids(self) -> list[int]:
        """The answer's token ids up to the first end token (or the first position not filled)."""
        ids: list[int] = []
        for pos in range(len(self.tokens)):
            token = self.tokens.get(pos)
            if token is None or token in self._end_ids:
                break
            ids.append(token)
        return ids

    def pieces(self) -> list[str]:
        """The text each answer position adds to the decoded answer, up to the first end token (or a gap).

        ``"".join(pieces)`` equals ``decode(answer ids)``; a position whose token completes a multi-byte
        character carries the whole character, the ones before it ''. Linear in the answer length: each
        position's text is the growth of a short window that starts at an earlier character boundary (the
        way streaming detokenizers work), not of the whole prefix; when the window's pieces do not add up to
        the decoded answer (a tokenizer that rewrites earlier text), the exact quadratic rule is used instead.
        """
        ids = self.answer_ids()
        out = windowed_pieces(self._decode, ids)
        if "".join(out) != self._decode(ids):
            out = prefix_pieces(self._decode, ids)
        return out


def windowed_pieces(decode: Callable[[list[int]], str], ids: list[int]) -> list[str]:
    """Pieces from ``decode`` of a window ``ids[start:n]``; the window starts at the previous clean boundary.

    A clean boundary is a position after which the decoded text ends in no partial character (no U+FFFD).
    The start moves there each time one is reached, so the window holds a few tokens and every decode is
    short; both the shown text and the new text are decoded from the same start, so a tokenizer that treats
    the first token of a text specially (a dropped leading space) affects both alike.
    """
    out: list[str] = []
    start = read = 0  # window start; the latest clean boundary
    shown = ""  # the text shown so far, decoded from ``start``
    for n in range(1, len(ids) + 1):
        raw = decode(ids[start:n])
        text = raw if n == len(ids) else raw.rstrip("\ufffd")
        if text.startswith(shown):
            out.append(text[len(shown) :])
            shown = text
        else:  # rewritten earlier text: the caller's check falls back to prefix_pieces
            out.append("")
        if not raw.endswith("\ufffd"):
            start, read = read, n
            shown = decode(ids[start:n]) if start < n else ""
    return out


def prefix_pieces(decode: Callable[[list[int]], str], ids: list[int]) -> list[str]:
    """Pieces from decoding every prefix (quadratic in ``len(ids)``): the rule :func:`windowed_pieces` follows."""
    out, shown = [], ""
    for n in range(1, len(ids) + 1):
        text = decode(ids[:n])
        if n < len(ids):
            text = text.rstrip("\ufffd")
        if text.startswith(shown):
            out.append(text[len(shown) :])
            shown = text
        else:  # the tokenizer rewrote earlier text (rare): give it to this position, keep the sum exact
            out.append("")
    if ids and "".join(out) != decode(ids):
        out[-1] += decode(ids)[len("".join(out)) :]
    return out


def add_trace_routes(
    app: FastAPI, worker: EngineWorker, default: DecodeConfig, llm: LLM, model_name: str, limits: ServerLimits
) -> None:
    """Install ``GET /``, ``/static/*``, ``GET /v1/trace/settings`` and ``POST /v1/trace`` on ``app``."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/trace/settings")
    async def trace_settings() -> dict[str, Any]:
        return {
            "model": model_name,
            "max_model_len": llm.max_context,
            "chat_template": bool(llm.tokenizer.has_chat_template),
            "defaults": default.to_dict(),
            "choices": {"decoder": list(DECODERS), "base": list(BASES), "confidence": list(CONFIDENCES)},
        }

    @app.post("/v1/trace", responses=TRACE_RESPONSES)
    async def trace(body: TraceRequest, request: Request) -> Response:
        if body.model is not None and body.model != model_name:
            raise ModelNotFoundError(body.model, model_name)
        overrides = dict(body.lopa or {})
        overrides.pop("trace", None)  # always on here
        request = body.model_copy(update={"lopa": overrides})
        config, max_tokens = decode_config_for(request, default, llm.max_context, limits.max_branches)
        config = config.replace(trace=True)
        chat = body.messages is not None
        prompt: Any = [m.as_template_message() for m in body.messages] if body.messages is not None else body.prompt
        ids = await asyncio.to_thread(llm.encode_prompt, prompt, not chat)
        llm.check_fits(ids, config)
        check_request(config, len(ids), llm, limits)  # the operator's limits, as on the completion routes
        job = Job([prompt], config, not chat, max_tokens, False, asyncio.get_running_loop())
        worker.submit(job)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            first = await job.events.get()  # Started, or Failed / Closed when it never ran
        finally:
            watcher.cancel()
        if isinstance(first, Failed):
            job.cancel.set()
            raise first.error
        if isinstance(first, Closed):
            return Response(status_code=499)  # client closed the request; nobody reads this
        start = {
            "id": new_id("trace"),
            "model": model_name,
            "settings": config.replace(trace=False).to_dict(),
            "chat": chat,
            "prompt_tokens": len(ids),
            **_answer_blocks(llm, config, len(ids)),
            "branches": config.num_branches,
        }
        return TraceStreamResponse(_events(job, start, StepConverter(llm, len(ids))), job)


def _answer_blocks(llm: LLM, config: DecodeConfig, prompt_len: int) -> dict[str, int]:
    """The answer's positions, its block size and the length of its first block: a block-causal model's first
    block also holds the prompt's tail (``lopa.engine.block_layout``), so it is shorter by that much."""
    block = config.block_size if config.uses_blocks or layout_block(llm.config, config) else config.max_new_tokens
    tail = prompt_len % block if layout_block(llm.config, config) else 0
    return {"positions": config.max_new_tokens - tail, "block_size": block, "first_block": block - tail}


async def _events(job: Job, start: dict, convert: StepConverter) -> AsyncIterator[tuple[str, dict]]:
    yield "start", start
    last_seconds = 0.0
    while not isinstance(item := await job.events.get(), Closed):
        if isinstance(item, Trace):
            for step in item.steps:
                last_seconds = step.seconds
                yield "step", convert.step(step)
        elif isinstance(item, Finished):
            done = {"text": item.text, "finish_reason": item.finish_reason, "usage": item.usage}
            pieces = await asyncio.to_thread(convert.pieces)  # off the event loop: /health and other streams go on
            yield "done", {**done, "seconds": round(last_seconds, 6), "pieces": pieces}
        elif isinstance(item, Failed):
            error = item.error
            if isinstance(error, LopaError) and not isinstance(error, DistributedError):
                yield "error", error_body(str(error), type_="invalid_request_error", code="invalid_parameter")
            else:
                yield (
                    "error",
                    error_body(f"internal error ({type(error).__name__}); see the server log", type_="server_error"),
                )
            return


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away before its stream starts."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            job.events.put_nowait(Closed())
            return
