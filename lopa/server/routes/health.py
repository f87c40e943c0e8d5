"""``GET /health``: whether the engine worker runs (200) or has stopped (503), and its queue counters."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from lopa.server.openapi import HEALTH_RESPONSES
from lopa.server.routes.context import served

router = APIRouter()


@router.get("/health", responses=HEALTH_RESPONSES)
async def health(request: Request) -> JSONResponse:
    worker = served(request).worker
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
