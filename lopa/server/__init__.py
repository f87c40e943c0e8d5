"""OpenAI-compatible HTTP server (``lopa serve``): FastAPI app, protocol models, the engine worker, and the two
views of a decoding trace (the live page at ``/`` in ``trace.py`` + ``static/``, and the PNG / GIF filling-order
map of ``trace_plot.py``, which ``lopa generate --trace-plot`` draws and which needs matplotlib, not FastAPI).

The app reaches the engine through the public API (``lopa.LLM``, ``DecodeConfig``, ``lopa.errors``,
``lopa.engine.output``) plus the engine's session protocol (``lopa.engine.protocol``), which the worker thread
drives. See ``docs/serve.md`` for usage.

``create_app`` is imported on first use, so importing ``lopa.server.trace_plot`` does not import FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lopa.server.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from lopa.server.app import create_app

        return create_app
    raise AttributeError(f"module 'lopa.server' has no attribute {name!r}")
