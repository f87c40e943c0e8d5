"""The live view's routes: the page (``GET /``; its files under ``/static`` are mounted by ``create_app``),
``GET /v1/trace/settings`` (what the page's form offers) and ``POST /v1/trace`` (the trace stream).

A trace request runs on the engine worker like every other request (the worker forwards the ``Trace`` items that
``LLM.stream`` yields); this module validates it, starts the job and frames the named events
(:mod:`lopa.server.trace` holds the request model and the conversion of trace steps to JSON). Invalid requests
are plain 4xx JSON answers before the stream starts, exactly as for the OpenAI routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from lopa.config import BASES, CONFIDENCES, DECODERS, DecodeConfig
from lopa.errors import DistributedError, LopaError
from lopa.server.handlers import ModelNotFoundError
from lopa.server.jobs import Closed, Failed, Finished, Job, Trace
from lopa.server.limits import check_request
from lopa.server.openapi import TRACE_RESPONSES
from lopa.server.params import decode_config_for
from lopa.server.protocol import error_body, new_id
from lopa.server.routes.context import served
from lopa.server.trace import STATIC_DIR, StepConverter, TraceRequest, TraceStreamResponse

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/v1/trace/settings")
async def trace_settings(request: Request) -> dict[str, Any]:
    model = served(request)
    return {
        "model": model.name,
        "max_model_len": model.llm.max_context,
        "chat_template": bool(model.llm.tokenizer.has_chat_template),
        "defaults": model.default.to_dict(),
        "choices": {"decoder": list(DECODERS), "base": list(BASES), "confidence": list(CONFIDENCES)},
    }


@router.post("/v1/trace", responses=TRACE_RESPONSES)
async def trace(body: TraceRequest, request: Request) -> Response:
    model = served(request)
    llm, model_name = model.llm, model.name
    if body.model is not None and body.model != model_name:
        raise ModelNotFoundError(body.model, model_name)
    overrides = dict(body.lopa or {})
    overrides.pop("trace", None)  # always on here
    asked = body.model_copy(update={"lopa": overrides})
    config, max_tokens = decode_config_for(asked, model.default, llm.max_context, model.limits.max_branches)
    config = config.replace(trace=True)
    chat = body.messages is not None
    prompt: Any = [m.as_template_message() for m in body.messages] if body.messages is not None else body.prompt
    ids = await asyncio.to_thread(llm.encode_prompt, prompt, not chat)
    llm.check_fits(ids, config)
    check_request(config, len(ids), llm, model.limits)  # the operator's limits, as on the completion routes
    job = Job([prompt], config, not chat, max_tokens, False, asyncio.get_running_loop())
    model.worker.submit(job)
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
        **_answer_blocks(llm.attention_block, config, len(ids)),
        "branches": config.num_branches,
    }
    return TraceStreamResponse(_events(job, start, StepConverter(llm, len(ids))), job)


def _answer_blocks(aligned: int | None, config: DecodeConfig, prompt_len: int) -> dict[str, int]:
    """The answer's positions, its block size and the length of its first block: a block-causal model's first
    block also holds the prompt's tail (``lopa.engine.block_layout``), so it is shorter by that much."""
    block = config.block_size if config.uses_blocks or aligned else config.max_new_tokens
    tail = prompt_len % block if aligned else 0
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
