"""The FastAPI application: OpenAI routes, the engine worker's lifespan, and streaming responses.

``create_app`` is called by ``lopa serve`` (``server/cli.py``) and by the tests. The app never calls the LLM
itself: each request becomes a :class:`~lopa.server.worker.Job` run by the engine worker thread, and
the route awaits the job's items, so the event loop stays free during forwards. A client that disconnects
sets the job's cancel flag (a watcher task before the response starts; Starlette's disconnect listener, which
cancels the SSE generator, afterwards). Errors are raised as exceptions and answered by ``handlers.py``;
the body size limit is ``middleware.py``; response and chunk bodies are built by ``sse.py``; the trace stream and
the page at ``/`` are ``trace.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from lopa import DecodeConfig, __version__
from lopa.errors import ConfigError
from lopa.server import sse
from lopa.server.handlers import ModelNotFoundError, add_error_handlers
from lopa.server.limits import (
    BODY_TIMEOUT_S,
    ServerLimits,
    cache_rows,
    check_prompt_count,
    check_request,
    kv_cache_bytes,
)
from lopa.server.metrics import add_metrics_route
from lopa.server.middleware import BodyLimitMiddleware, InternalErrorMiddleware, SecurityHeadersMiddleware
from lopa.server.openapi import GENERATION_RESPONSES, HEALTH_RESPONSES, MODEL_RESPONSES, install_openapi
from lopa.server.params import decode_config_for
from lopa.server.protocol import ChatCompletionRequest, CompletionRequest, sum_usage
from lopa.server.trace import add_trace_routes
from lopa.server.worker import Closed, Delta, EngineWorker, Failed, Finished, Job

if TYPE_CHECKING:
    from lopa import LLM

_GONE = object()  # put on a job's queue when its client disconnects


def create_app(
    llm: LLM,
    *,
    default_config: DecodeConfig | None = None,
    queue_limit: int = 64,
    max_body_bytes: int = 1 << 20,
    served_model_name: str | None = None,
    limits: ServerLimits | None = None,
    api_docs: bool = False,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> FastAPI:
    """An ASGI app serving ``llm``; the engine worker thread runs for the app's lifespan.

    ``api_docs`` turns on FastAPI's ``/docs`` and ``/redoc`` pages, which load their scripts from a CDN (off by
    default: the server then makes the browser fetch nothing from elsewhere); ``/openapi.json`` is always served.
    """
    if not isinstance(queue_limit, int) or queue_limit < 1:
        raise ConfigError(f"queue_limit must be an integer >= 1, got {queue_limit!r}")
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1024:
        raise ConfigError(f"max_body_bytes must be an integer >= 1024, got {max_body_bytes!r}")
    if isinstance(body_timeout_s, bool) or not isinstance(body_timeout_s, (int, float)) or not body_timeout_s > 0:
        raise ConfigError(f"body_timeout_s must be a number > 0, got {body_timeout_s!r}")
    default = (default_config or llm.default_config).validate()  # the checkpoint's recommended settings
    limits = (limits or ServerLimits()).validate()
    # a cache larger than a request at the server's defaults needs is freed after the request that grew it
    llm.max_idle_cache_bytes = kv_cache_bytes(llm, max(1, cache_rows(default)), llm.max_context)
    model_name = served_model_name or llm.model_name
    worker = EngineWorker(llm, queue_limit)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    docs = ("/docs", "/redoc") if api_docs else (None, None)
    app = FastAPI(title="lopa", version=__version__, lifespan=lifespan, docs_url=docs[0], redoc_url=docs[1])
    app.state.worker = worker
    app.add_middleware(InternalErrorMiddleware)  # innermost: sees the routes' unhandled errors
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    app.add_middleware(SecurityHeadersMiddleware, exempt=tuple(d for d in docs if d is not None))
    add_metrics_route(app, worker)  # GET /metrics and the HTTP counter, outermost (metrics.py)
    add_error_handlers(app)
    add_trace_routes(app, worker, default, llm, model_name, limits)  # the live view: GET /, POST /v1/trace (trace.py)
    install_openapi(app, limits.max_branches, llm.max_context)

    def model_card() -> dict[str, Any]:
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "lopa",
            "max_model_len": llm.max_context,
        }

    @app.get("/health", responses=HEALTH_RESPONSES)
    async def health() -> JSONResponse:
        body = {
            "status": "ok" if worker.alive else "engine worker stopped",
            "running": worker.running,
            "waiting": worker.waiting,
            "completed": worker.completed,
            "failed": worker.failed,
            "cancelled": worker.cancelled,
            "queue_limit": worker.queue_limit,
        }
        return JSONResponse(body, status_code=200 if worker.alive else 503)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", responses=MODEL_RESPONSES)
    async def get_model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise ModelNotFoundError(name, model_name)
        return model_card()

    @app.post("/v1/completions", responses=GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompts = body.prompts()
        check_prompt_count(len(prompts), limits)  # before tokenizing: a 1 MiB body may hold 170k prompts
        if body.stream and len(prompts) > 1:
            raise ConfigError("streaming takes one prompt per request; send the prompts as separate requests")
        return await _serve(request, body, prompts, raw=True, chat=False)

    @app.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        messages = [m.as_template_message() for m in body.messages]
        return await _serve(request, body, [messages], raw=False, chat=True)

    async def _serve(request: Request, body: Any, prompts: list[Any], *, raw: bool, chat: bool) -> Response:
        if body.model is not None and body.model != model_name:
            raise ModelNotFoundError(body.model, model_name)
        config, max_tokens = decode_config_for(body, default, llm.max_context, limits.max_branches)
        # tokenized off the event loop; a bad prompt (mask token, ids outside the vocabulary) is a 400 here
        counts = await asyncio.to_thread(lambda: [llm.count_prompt_tokens(p, raw) for p in prompts])
        check_request(config, counts, llm, limits)  # the KV budget is charged per prompt
        job = Job(prompts, config, raw, max_tokens, body.stream, asyncio.get_running_loop())
        worker.submit(job)
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
                return sse.EventStreamResponse(chunks(_events(job), model_name, include_usage), job)
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
            return JSONResponse(build(finished, model_name, usage))
        finally:
            if not streaming:
                job.cancel.set()  # no-op when the job is done; stops it when we leave early (error, shutdown)
            watcher.cancel()

    return app


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
