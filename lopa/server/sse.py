"""OpenAI response bodies and Server-Sent Events chunks, built from the worker's items (used by ``routes/openai.py``).

Streams follow OpenAI's chunk format: ``text_completion`` chunks for ``/v1/completions``, ``chat.completion.chunk``
for chat (a first chunk carrying the assistant role, then content deltas, then an empty delta with the
finish reason), an optional usage chunk with no choices (``stream_options.include_usage``), and
``data: [DONE]``. A delta is text the engine has made final, so nothing sent is ever revised. An engine error
after the stream started is sent as an ``{"error": ...}`` event, which the ``openai`` client raises.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lopa.errors import DistributedError, LopaError
from lopa.server.jobs import Delta, Failed, Finished, Job
from lopa.server.protocol import error_body, new_id, now

Items = AsyncIterator[Delta | Finished | Failed]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class JobStreamResponse(StreamingResponse):
    """``text/event-stream`` of already framed events; cancels the job however the response ends (done, error,
    client gone: Starlette cancels the response on disconnect, possibly before the first event was even pulled)."""

    def __init__(self, body: AsyncIterator[str], job: Job) -> None:
        super().__init__(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.cancel.set()


class EventStreamResponse(JobStreamResponse):
    """``text/event-stream`` of OpenAI chunks, ending in ``data: [DONE]``."""

    def __init__(self, chunks: AsyncIterator[dict], job: Job) -> None:
        super().__init__(_frame(chunks), job)


async def _frame(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    async for chunk in chunks:
        yield f"data: {_dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


def _error_chunk(error: Exception) -> dict:
    if isinstance(error, LopaError) and not isinstance(error, DistributedError):
        return error_body(str(error), type_="invalid_request_error", code="invalid_parameter")
    return error_body(f"internal error ({type(error).__name__}); see the server log", type_="server_error")


async def completion_chunks(items: Items, model: str, include_usage: bool) -> AsyncIterator[dict]:
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model}
    extra = {"usage": None} if include_usage else {}
    usage = None
    async for item in items:
        if isinstance(item, Failed):
            yield _error_chunk(item.error)
            return
        if isinstance(item, Delta):
            choice = {"index": item.index, "text": item.text, "logprobs": None, "finish_reason": None}
        else:
            choice = {"index": item.index, "text": "", "logprobs": None, "finish_reason": item.finish_reason}
            usage = item.usage
        yield {**head, "choices": [choice], **extra}
    if include_usage and usage is not None:
        yield {**head, "choices": [], "usage": usage}


async def chat_chunks(items: Items, model: str, include_usage: bool) -> AsyncIterator[dict]:
    head = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": model}
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "choices": [choice], **extra}

    yield chunk({"role": "assistant", "content": ""})
    usage = None
    async for item in items:
        if isinstance(item, Failed):
            yield _error_chunk(item.error)
            return
        if isinstance(item, Delta):
            yield chunk({"content": item.text})
        else:
            yield chunk({}, item.finish_reason)
            usage = item.usage
    if include_usage and usage is not None:
        yield {**head, "choices": [], "usage": usage}


def completion_response(finished: list[Finished], model: str, usage: dict) -> dict:
    choices = [{"index": f.index, "text": f.text, "logprobs": None, "finish_reason": f.finish_reason} for f in finished]
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def chat_response(finished: list[Finished], model: str, usage: dict) -> dict:
    choices = [
        {
            "index": f.index,
            "message": {"role": "assistant", "content": f.text},
            "logprobs": None,
            "finish_reason": f.finish_reason,
        }
        for f in finished
    ]
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "usage": usage,
    }
