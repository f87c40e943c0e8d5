"""The server's routes as FastAPI ``APIRouter`` s, included by :func:`lopa.server.app.create_app`.

``openai.py``: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``; ``health.py``: ``GET /health``;
``trace.py``: the live view (``GET /``, ``POST /v1/trace``, ``/v1/trace/settings``). ``/metrics`` is installed by
:mod:`lopa.server.metrics` with its middleware. Every route reads what the app serves (the LLM, its engine worker,
the default decode settings and limits) from one :class:`~lopa.server.routes.context.ServedModel` kept on the app.
"""
