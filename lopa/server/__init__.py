"""OpenAI-compatible HTTP server (``lopa serve``): FastAPI app, protocol models and the engine worker.

Only the public API (``lopa.LLM``, ``DecodeConfig``, ``lopa.errors``, ``lopa.engine.output``) is used from here; see
``docs/serve.md`` for usage.
"""

from lopa.server.app import create_app

__all__ = ["create_app"]
