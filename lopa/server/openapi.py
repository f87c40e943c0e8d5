"""The OpenAPI schema the server publishes at ``/openapi.json``, made to match what the routes really do.

FastAPI's generated schema is corrected in three ways (installed by ``create_app``): the 422 it adds to every
route is dropped (validation errors are 400 here), every error status a route can answer is declared with
OpenAI's error body (400, 404, 413, 503 with ``Retry-After``) and 200 declares ``text/event-stream`` beside JSON;
the ``lopa`` request field is described field by field from :class:`~lopa.DecodeConfig`, with this server's
``--max-branches`` and the model's context as maxima. What a schema cannot say (``max_new_tokens`` a multiple of
``block_size``, prompt plus tokens within the context, the KV cache budget, no mask token in the prompt) is
still checked by the server and answered with a 400 naming the problem.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from lopa.config import BASES, BRANCH_SCORES, CONFIDENCES, DECODERS, HELP, ORDERS


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope, the body of every 4xx."""

    error: ErrorDetail


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if headers:
        out["headers"] = headers
    return out


GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the completion (JSON), or with `stream: true` Server-Sent Events ending in `data: [DONE]`",
        # each event's data is one JSON chunk (the JSON response's shape, per OpenAI), the last one [DONE]
        "content": {"text/event-stream": {"schema": {"description": "a completion chunk, or [DONE]"}}},
    },
    400: _error("invalid request: bad JSON, types, ranges, unsupported fields, prompt or limits (message says which)"),
    404: _error("unknown model"),
    413: _error("request body over --max-body-bytes"),
    503: _error(
        "the queue is full; retry after the given seconds",
        {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}, "required": True}},
    ),
}
TRACE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **GENERATION_RESPONSES,
    200: {
        "description": "Server-Sent Events named start, step (one per forward), then done or error (docs/serve.md)",
        "content": {"text/event-stream": {"schema": {"description": "one JSON object per named event"}}},
    },
}
MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {404: _error("unknown model")}
HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {503: {"description": "the engine worker stopped"}}

_ENUMS = {"decoder": DECODERS, "base": BASES, "confidence": CONFIDENCES, "order": ORDERS, "branch_score": BRANCH_SCORES}
_UNIT = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}


def lopa_schema(max_branches: int, max_context: int) -> dict[str, Any]:
    """JSON schema of the ``lopa`` request field: DecodeConfig's fields with their ranges."""
    ints = {
        "branches": (0, max_branches),
        "block_size": (1, max_context),
        "max_new_tokens": (1, max_context - 1),
        "top_k": (0, None),
        "seed": (0, None),
        "extra_fill": (0, None),
        "min_fill": (1, None),
        "max_iterations": (0, None),
    }
    props: dict[str, Any] = {name: {"type": "string", "enum": list(values)} for name, values in _ENUMS.items()}
    for name, (low, high) in ints.items():
        props[name] = {"type": "integer", "minimum": low, **({"maximum": high} if high is not None else {})}
    for name in ("threshold", "tau_add", "tau_act", "top_p"):
        props[name] = dict(_UNIT)
    props["temperature"] = {"type": "number", "minimum": 0, "maximum": 100}
    props["stop"] = {"type": "array", "items": {"type": "string", "minLength": 1}}
    props["trace"] = {"type": "boolean", "enum": [False], "description": "traces are not returned over HTTP"}
    props["force_anchor"] = {"type": "boolean"}
    for name, prop in props.items():
        prop.setdefault("description", HELP.get(name, ""))
    return {
        "type": "object",
        "properties": props,
        "additionalProperties": False,
        "description": "lopa's decoding settings (DecodeConfig); max_new_tokens must be a multiple of block_size "
        "for the block decoders, and cannot be given together with max_tokens",
    }


def install_openapi(app: FastAPI, max_branches: int, max_context: int) -> None:
    """Replace ``app.openapi`` with the corrected schema (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            lopa = lopa_schema(max_branches, max_context)
            for request in ("CompletionRequest", "ChatCompletionRequest", "TraceRequest"):
                if request in components:
                    components[request]["properties"]["lopa"] = {"anyOf": [lopa, {"type": "null"}]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
