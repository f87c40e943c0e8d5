"""Slow and idle clients: a cap on open connections, a deadline for request headers, uvicorn's own limits.

uvicorn reads request headers without a deadline and accepts connections until the process runs out of file
descriptors, so clients that open many connections and send a byte now and then (slowloris) can make a server
unreachable. :class:`GuardedH11Protocol` (uvicorn's h11 protocol plus two rules) and :func:`uvicorn_options`
close that:

- **Header deadline:** a connection must deliver a request's headers within ``header_timeout_s`` of opening (or
  of its previous response); otherwise it is closed. A request in progress is never cut by this deadline.
- **Connection cap:** at most ``max_connections`` are open. A new connection over the cap makes the server close
  the connection that has waited longest for its request headers (an idle or slow one); when every open
  connection has a request in progress, the new one is answered 503 and closed. The default cap leaves file
  descriptors to spare under ``ulimit -n`` (:func:`default_max_connections`).

The request *body* has its own deadline, enforced where the body is read (``middleware.BodyLimitMiddleware``).
uvicorn's ``limit_concurrency`` (requests in progress, 503 beyond), ``timeout_keep_alive`` and h11's header-size
limit are set too. Used by ``lopa serve`` (``commands/serve.py``) and
:func:`lopa.server.background.serve_in_background`.
"""

from __future__ import annotations

import asyncio
import resource
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from lopa.server.limits import HEADER_TIMEOUT_S

KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's default)
MAX_HEADER_BYTES = 16 * 1024  # h11's largest incomplete event: request line plus headers
_FD_RESERVE = 64  # descriptors kept free for the process itself (weights, logs, the worker ranks' pipes)
_SLACK = 16  # connections closed for room stay counted by uvicorn until their close completes
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\nretry-after: 1\r\n\r\n"


def default_max_connections() -> int:
    """Open connections allowed by default: the soft ``ulimit -n`` less a reserve, between 16 and 4096."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, soft - _FD_RESERVE))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the header deadline and the connection cap (set by :func:`guarded_protocol`)."""

    max_connections = 1024
    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self.waiting_since = time.monotonic()
        if len(self.connections) > self.max_connections and not self._make_room():
            transport.write(_BUSY)
            transport.close()
            return
        self._arm()

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for its request's headers; False if none is waiting."""
        waiting = [c for c in self.connections if c is not self and getattr(c, "waiting_for_request", False)]
        if not waiting:
            return False
        min(waiting, key=lambda c: c.waiting_since).transport.close()  # is_closing() from now on
        return True

    @property
    def waiting_for_request(self) -> bool:
        """Open, and between requests: no request's headers have arrived since the last response."""
        return not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self.waiting_since = time.monotonic()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _header_deadline(self) -> None:
        self._deadline = None
        if self.waiting_for_request:  # no request's headers arrived in time: free the slot
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's headers get a fresh deadline

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()  # type: ignore[union-attr]
            self._deadline = None
        super().connection_lost(exc)


def guarded_protocol(max_connections: int, header_timeout_s: float) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol class with these limits (uvicorn instantiates it per connection)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"max_connections": max_connections, "header_timeout_s": header_timeout_s},
    )


def uvicorn_options(max_connections: int | None = None, header_timeout_s: float = HEADER_TIMEOUT_S) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` that apply every limit above."""
    cap = default_max_connections() if max_connections is None else max_connections
    return {
        "http": guarded_protocol(cap, header_timeout_s),
        # uvicorn answers 503 once connections or running requests reach this; connections are capped above, so
        # it bounds requests in progress (with room for connections being closed, counted until they are gone)
        "limit_concurrency": cap + _SLACK,
        "timeout_keep_alive": KEEP_ALIVE_S,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
    }
