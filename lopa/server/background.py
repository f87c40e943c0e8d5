"""Run an ASGI app under uvicorn in a background thread (tests, notebooks, evaluation scripts).

``lopa serve`` runs uvicorn in the foreground; this helper is for a caller that wants a real HTTP server
inside its own process, on a free port, and a clean shutdown when it is done::

    with serve_in_background(create_app(llm)) as base_url:
        OpenAI(base_url=f"{base_url}/v1", api_key="-").completions.create(...)
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from lopa.server.guard import uvicorn_options


@contextlib.contextmanager
def serve_in_background(app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Start ``app`` on ``host:port`` (0 = a free port) and yield its base URL, ``http://host:port``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # bound before uvicorn starts, so the port is known and cannot be taken meanwhile
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **uvicorn_options()))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lopa-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the HTTP server did not start on {host}:{port} within {timeout}s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
