"""The FastAPI application: the engine worker's lifespan, the middleware stack, and the routes put together.

``create_app`` is called by ``lopa serve`` (``commands/serve.py``) and by the tests. It validates the server's
settings, starts the engine worker for the app's lifespan, keeps what the routes need in ``app.state.served``
(:class:`~lopa.server.routes.context.ServedModel`) and includes the routers of ``routes/`` (OpenAI, health, the
live trace view). The body size limit is ``middleware.py``; errors are answered by ``handlers.py``; ``GET
/metrics`` is ``metrics.py``; the published schema is ``openapi.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from lopa import DecodeConfig, __version__
from lopa.config import ServerConfig
from lopa.server.handlers import add_error_handlers
from lopa.server.limits import ServerLimits, kv_cache_bytes
from lopa.server.metrics import add_metrics_route
from lopa.server.middleware import BodyLimitMiddleware, InternalErrorMiddleware, SecurityHeadersMiddleware
from lopa.server.openapi import install_openapi
from lopa.server.routes import health, openai, trace
from lopa.server.routes.context import ServedModel
from lopa.server.trace import STATIC_DIR
from lopa.server.worker import EngineWorker

if TYPE_CHECKING:
    from lopa.engine.protocol import Engine


def create_app(
    llm: Engine,
    *,
    default_config: DecodeConfig | None = None,
    server: ServerConfig | None = None,
    queue_limit: int | None = None,
    max_body_bytes: int | None = None,
    served_model_name: str | None = None,
    limits: ServerLimits | None = None,
    api_docs: bool | None = None,
    body_timeout_s: float | None = None,
) -> FastAPI:
    """An ASGI app serving ``llm``; the engine worker thread runs for the app's lifespan.

    ``server`` holds the settings (``lopa serve``'s flags); a keyword given here replaces its field (``limits``
    replaces the per-request limits). ``api_docs`` turns on FastAPI's ``/docs`` and ``/redoc`` pages, which load
    their scripts from a CDN (off by default: the server then makes the browser fetch nothing from elsewhere);
    ``/openapi.json`` is always served.
    """
    given = {
        "queue_limit": queue_limit,
        "max_body_bytes": max_body_bytes,
        "served_model_name": served_model_name,
        "api_docs": api_docs,
        "body_timeout": body_timeout_s,
    }
    if limits is not None:
        given.update(vars(limits))
    settings = (server or ServerConfig()).replace(**{k: v for k, v in given.items() if v is not None}).validate()
    queue_limit, max_body_bytes, api_docs = settings.queue_limit, settings.max_body_bytes, settings.api_docs
    body_timeout_s, served_model_name = settings.body_timeout, settings.served_model_name
    default = (default_config or llm.default_config).validate()  # the checkpoint's recommended settings
    limits = ServerLimits.of(settings).validate()
    # a cache larger than a request at the server's defaults needs is freed after the request that grew it
    llm.max_idle_cache_bytes = kv_cache_bytes(llm, max(1, default.cache_rows), llm.max_context)
    model_name = served_model_name or llm.model_name
    worker = EngineWorker(llm, queue_limit)

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
    app.state.served = ServedModel(llm, worker, model_name, default, limits, int(time.time()))
    app.add_middleware(InternalErrorMiddleware)  # innermost: sees the routes' unhandled errors
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    app.add_middleware(SecurityHeadersMiddleware, exempt=tuple(d for d in docs if d is not None))
    add_metrics_route(app, worker)  # GET /metrics and the HTTP counter, outermost (metrics.py)
    add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")  # the live view's files
    app.include_router(trace.router)  # the live view: GET /, POST /v1/trace
    install_openapi(app, limits.max_branches, llm.max_context)
    app.include_router(health.router)
    app.include_router(openai.router)
    return app
