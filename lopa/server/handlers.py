"""Exception → HTTP response mapping for the server (installed by ``create_app``).

Status codes: 400 for every invalid request (bad JSON, wrong types, unknown fields, out-of-range or unsupported
parameters, prompt too long; FastAPI's own validation errors included, so 422 is never used), 404 for unknown
models and routes, 405 for wrong methods, 413 for bodies over the limit (``middleware.py``), 503 with
``Retry-After`` when the queue is full. A 5xx is always a server bug. Every error body is OpenAI's
``{"error": {"message", "type", "param", "code"}}``, and the message says what to change.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lopa.errors import (
    DistributedError,
    InvalidTextError,
    LimitExceededError,
    LopaError,
    MaskTokenInPromptError,
    PromptTooLongError,
)
from lopa.server.jobs import QueueFullError
from lopa.server.protocol import error_body

# what a field accepts, for fields typed as a union (pydantic reports one error per union member otherwise)
_UNION_HINTS = {
    "prompt": "must be a non-empty string, a list of token ids, or a list of strings or of token-id lists",
    "stop": "must be a string or a list of strings",
    "content": 'must be a string or a list of {"type": "text", "text": ...} parts (only text is supported)',
}
_MAX_REPORTED = 5


class ModelNotFoundError(Exception):
    def __init__(self, name: str, served: str) -> None:
        super().__init__(f"the model '{name}' does not exist; this server serves '{served}' (see GET /v1/models)")


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


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for pydantic errors: one line per field, union members folded into one hint."""
    parts: list[str] = []
    param = None
    for err in errors:
        raw_loc = [x for x in err.get("loc", ()) if x != "body"]
        # union members appear in loc as type tags such as 'str' or 'list[int]'; keep field names and indices
        loc = [str(x) for x in raw_loc if isinstance(x, int) or (x.isidentifier() and x not in ("str", "int"))]
        in_union = len(loc) < len(raw_loc)
        kind = err.get("type")
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if kind == "json_invalid":
            loc, msg = [], f"the body is not valid JSON ({err.get('ctx', {}).get('error', msg)})"
        elif not loc and kind in ("missing", "model_attributes_type", "dict_type"):
            msg = "the request body must be a JSON object"
        elif in_union and any(x in _UNION_HINTS for x in loc):
            # report the union field itself: messages.0.content.list[TextPart].0.type -> messages.0.content
            k = max(i for i, x in enumerate(loc) if x in _UNION_HINTS)
            loc, msg = loc[: k + 1], _UNION_HINTS[loc[k]]
        elif kind == "extra_forbidden":
            msg = "unknown field (lopa's own decoding settings go in the 'lopa' object)"
        line = f"{'.'.join(loc)}: {msg}" if loc else msg
        if line not in parts:
            parts.append(line)
        param = param or (".".join(loc) or None)
    message = "; ".join(parts[:_MAX_REPORTED]) or "invalid request"
    return message, param


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        message, param = validation_message(errors)
        text = any(isinstance(e.get("ctx", {}).get("error"), InvalidTextError) for e in errors)
        code = "invalid_text" if text else "invalid_request"
        return error_response(400, message, type_="invalid_request_error", code=code, param=param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        message = {
            404: f"no such route: {where}; routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/trace, "
            "/health, /metrics, / (the live view)",
            405: f"method not allowed: {where}",
        }.get(exc.status_code, f"{exc.detail} ({where})")
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, message, type_=kind, headers=exc.headers)

    @app.exception_handler(ModelNotFoundError)
    async def _no_model(_: Request, exc: ModelNotFoundError) -> JSONResponse:
        return error_response(404, str(exc), type_="invalid_request_error", code="model_not_found", param="model")

    @app.exception_handler(QueueFullError)
    async def _busy(_: Request, exc: QueueFullError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)}
        return error_response(503, str(exc), type_="server_overloaded", code="queue_full", headers=headers)

    @app.exception_handler(LopaError)
    async def _lopa(_: Request, exc: LopaError) -> JSONResponse:
        if isinstance(exc, DistributedError):  # the engine's fault, not the client's
            return error_response(500, str(exc), type_="server_error", code="engine_error")
        code = "invalid_parameter"
        if isinstance(exc, PromptTooLongError):
            code = "context_length_exceeded"
        elif isinstance(exc, MaskTokenInPromptError):
            code = "mask_token_in_prompt"
        elif isinstance(exc, LimitExceededError):
            code = "limit_exceeded"
        elif isinstance(exc, InvalidTextError):
            code = "invalid_text"
        return error_response(400, str(exc), type_="invalid_request_error", code=code)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log", type_="server_error")
