"""The OpenAI routes: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``.

The routes never call the LLM themselves: each request becomes a :class:`~lopa.server.jobs.Job` run by the
engine worker thread, and the route awaits the job's items, so the event loop stays free during forwards. A
client that disconnects sets the job's cancel flag (a watcher task before the response starts; Starlette's
disconnect listener, which cancels the SSE generator, afterwards). Errors are raised as exceptions and answered by
``handlers.py``; response and chunk bodies are built by ``sse.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lopa.errors import ConfigError
from lopa.server import sse
from lopa.server.handlers import ModelNotFoundError
from lopa.server.jobs import Closed, Delta, Failed, Finished, Job
from lopa.server.limits import check_prompt_count, check_request
from lopa.server.openapi import GENERATION_RESPONSES, MODEL_RESPONSES
from lopa.server.params import decode_config_for
from lopa.server.protocol import ChatCompletionRequest, CompletionRequest, sum_usage
from lopa.server.routes.context import ServedModel, served

router = APIRouter()
_GONE = object()  # put on a job's queue when its client disconnects


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [served(request).card()]}


@router.get("/v1/models/{name:path}", responses=MODEL_RESPONSES)
async def get_model(name: str, request: Request) -> dict[str, Any]:
    model = served(request)
    if name != model.name:
        raise ModelNotFoundError(name, model.name)
    return model.card()


@router.post("/v1/completions", responses=GENERATION_RESPONSES)
async def completions(body: CompletionRequest, request: Request) -> Response:
    prompts = body.prompts()
    check_prompt_count(len(prompts), served(request).limits)  # before tokenizing: a 1 MiB body may hold 170k prompts
    if body.stream and len(prompts) > 1:
        raise ConfigError("streaming takes one prompt per request; send the prompts as separate requests")
    return await _serve(served(request), request, body, prompts, raw=True, chat=False)


@router.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    messages = [m.as_template_message() for m in body.messages]
    return await _serve(served(request), request, body, [messages], raw=False, chat=True)


async def _serve(
    model: ServedModel, request: Request, body: Any, prompts: list[Any], *, raw: bool, chat: bool
) -> Response:
    """Check the request, run it as one job and answer with the whole response or its SSE stream."""
    if body.model is not None and body.model != model.name:
        raise ModelNotFoundError(body.model, model.name)
    llm, limits = model.llm, model.limits
    config, max_tokens = decode_config_for(body, model.default, llm.max_context, limits.max_branches)
    # tokenized off the event loop; a bad prompt (mask token, ids outside the vocabulary) is a 400 here
    counts = await asyncio.to_thread(lambda: [llm.count_prompt_tokens(p, raw) for p in prompts])
    check_request(config, counts, llm, limits)  # the KV budget is charged per prompt
    job = Job(prompts, config, raw, max_tokens, body.stream, asyncio.get_running_loop())
    model.worker.submit(job)
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    streaming = False  # once the SSE response owns the job, it cancels the job when it ends
    try:
        first = await _next(job)
        if isinstance(first, Failed):
            raise first.error
        if first is _GONE or isinstance(first, Closed):
            return Response(status_code=499)  # client closed the request; nobody reads this
        if body.stream:
            watcher.cancel()  # from here Starlette's own listener cancels the SSE response on disconnect
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = sse.chat_chunks if chat else sse.completion_chunks
            streaming = True
            return sse.EventStreamResponse(chunks(_events(job), model.name, include_usage), job)
        finished: list[Finished] = []
        while not isinstance(item := await _next(job), Closed):
            if item is _GONE:
                return Response(status_code=499)
            if isinstance(item, Failed):
                raise item.error
            if isinstance(item, Finished):
                finished.append(item)
        finished.sort(key=lambda f: f.index)  # a job's prompts run together and may finish in any order
        usage = sum_usage([f.usage for f in finished])
        build = sse.chat_response if chat else sse.completion_response
        return JSONResponse(build(finished, model.name, usage))
    finally:
        if not streaming:
            job.cancel.set()  # no-op when the job is done; stops it when we leave early (error, shutdown)
        watcher.cancel()


async def _next(job: Job) -> object:
    return await job.events.get()


async def _events(job: Job) -> AsyncIterator[Delta | Finished | Failed]:
    """The job's items until Closed (consumed by the SSE generators)."""
    while not isinstance(item := await job.events.get(), Closed):
        if isinstance(item, (Delta, Finished, Failed)):
            yield item


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away before its response starts."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            job.events.put_nowait(_GONE)
            return
