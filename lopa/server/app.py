"""The FastAPI application: OpenAI routes, SSE streaming, error mapping and the body size limit.

``create_app`` is called by ``lopa serve`` (``server/cli.py``) and by the tests. The app never calls the LLM
itself: each request becomes a :class:`~lopa.server.worker.Job` run by the single engine worker thread, and
the route awaits the job's items, so the event loop stays free during forwards. A client that disconnects
sets the job's cancel flag (a watcher task before the response starts; Starlette's disconnect listener, which
cancels the SSE generator, afterwards). Status codes: 400 for every invalid request (bad JSON, wrong types,
out-of-range or unsupported parameters, prompt too long), 404 for unknown models and routes, 405 for wrong
methods, 413 for bodies over ``max_body_bytes``, 503 with ``Retry-After`` when the queue is full; a 5xx is
always a server bug. Every error body is OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lopa import DecodeConfig
from lopa.errors import ConfigError, DistributedError, LopaError, PromptTooLongError
from lopa.server import sse
from lopa.server.middleware import BodyLimitMiddleware
from lopa.server.params import decode_config_for
from lopa.server.protocol import ChatCompletionRequest, CompletionRequest, error_body, sum_usage
from lopa.server.worker import Closed, Delta, EngineWorker, Failed, Finished, Job, QueueFullError

if TYPE_CHECKING:
    from lopa import LLM

_GONE = object()  # put on a job's queue when its client disconnects


class ModelNotFoundError(Exception):
    def __init__(self, name: str, served: str) -> None:
        super().__init__(f"the model '{name}' does not exist; this server serves '{served}' (see GET /v1/models)")


def create_app(
    llm: LLM,
    *,
    default_config: DecodeConfig | None = None,
    queue_limit: int = 64,
    max_body_bytes: int = 1 << 20,
    served_model_name: str | None = None,
) -> FastAPI:
    """An ASGI app serving ``llm``; the engine worker thread runs for the app's lifespan."""
    if not isinstance(queue_limit, int) or queue_limit < 1:
        raise ConfigError(f"queue_limit must be an integer >= 1, got {queue_limit!r}")
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1024:
        raise ConfigError(f"max_body_bytes must be an integer >= 1024, got {max_body_bytes!r}")
    default = (default_config or DecodeConfig()).validate()
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

    app = FastAPI(title="lopa", version="1", lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    _add_error_handlers(app)

    def model_card() -> dict[str, Any]:
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "lopa",
            "max_model_len": llm.max_context,
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {
            "status": "ok" if worker.alive else "engine worker stopped",
            "running": worker.running,
            "waiting": worker.waiting,
            "queue_limit": worker.queue_limit,
        }
        return JSONResponse(body, status_code=200 if worker.alive else 503)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise ModelNotFoundError(name, model_name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompts = body.prompts()
        if body.stream and len(prompts) > 1:
            raise ConfigError("streaming takes one prompt per request; send the prompts as separate requests")
        return await _serve(request, body, prompts, raw=True, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        messages = [m.as_template_message() for m in body.messages]
        return await _serve(request, body, [messages], raw=False, chat=True)

    async def _serve(request: Request, body: Any, prompts: list[Any], *, raw: bool, chat: bool) -> Response:
        if body.model is not None and body.model != model_name:
            raise ModelNotFoundError(body.model, model_name)
        config, max_tokens = decode_config_for(body, default, llm.max_context)
        job = Job(prompts, config, raw, max_tokens, body.stream, asyncio.get_running_loop())
        worker.submit(job)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            first = await _next(job)
            if isinstance(first, Failed):
                raise first.error
            if first is _GONE or isinstance(first, Closed):
                return Response(status_code=499)  # client closed the request; nobody reads this
            if body.stream:
                watcher.cancel()  # from here Starlette's own listener cancels the SSE generator on disconnect
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                chunks = sse.chat_chunks if chat else sse.completion_chunks
                events = _events(job)
                return StreamingResponse(
                    sse.encode(chunks(events, model_name, include_usage), job),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            finished: list[Finished] = []
            while not isinstance(item := await _next(job), Closed):
                if item is _GONE:
                    return Response(status_code=499)
                if isinstance(item, Failed):
                    raise item.error
                if isinstance(item, Finished):
                    finished.append(item)
            usage = sum_usage([f.usage for f in finished])
            build = sse.chat_response if chat else sse.completion_response
            return JSONResponse(build(finished, model_name, usage))
        finally:
            if not body.stream:
                job.cancel.set()  # no-op when the job is done; stops it when we leave early
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


def error_response(
    status: int,
    message: str,
    *,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type_=type_, code=code, param=param), status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        parts, param = [], None
        for err in errors[:5]:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            if err.get("type") == "json_invalid":
                msg = f"the body is not valid JSON ({err.get('ctx', {}).get('error', msg)})"
                loc = []
            elif err.get("type") == "extra_forbidden":
                msg = "unknown field; see the OpenAI API reference (lopa's own settings go in the 'lopa' field)"
            elif err.get("type") == "missing" and not loc:
                msg = "the request needs a JSON object body"
            param = param or (".".join(loc) or None)
            parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
        return error_response(
            400,
            "; ".join(parts) or "invalid request",
            type_="invalid_request_error",
            code="invalid_request",
            param=param,
        )

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), type_=kind, headers=exc.headers)

    @app.exception_handler(ModelNotFoundError)
    async def _no_model(_: Request, exc: ModelNotFoundError) -> JSONResponse:
        return error_response(404, str(exc), type_="invalid_request_error", code="model_not_found", param="model")

    @app.exception_handler(QueueFullError)
    async def _busy(_: Request, exc: QueueFullError) -> JSONResponse:
        return error_response(
            503, str(exc), type_="server_overloaded", code="queue_full", headers={"Retry-After": str(exc.retry_after)}
        )

    @app.exception_handler(LopaError)
    async def _lopa(_: Request, exc: LopaError) -> JSONResponse:
        if isinstance(exc, DistributedError):  # the engine's fault, not the client's
            return error_response(500, str(exc), type_="server_error", code="engine_error")
        code = "context_length_exceeded" if isinstance(exc, PromptTooLongError) else "invalid_parameter"
        return error_response(400, str(exc), type_="invalid_request_error", code=code)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log", type_="server_error")
