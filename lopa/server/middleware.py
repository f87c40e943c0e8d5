"""Request body size limit, security headers and the last-resort 500, as pure ASGI middlewares (``create_app``).

The body is read here, before any route parses it, and counted as it arrives, so a client cannot make the
server buffer more than ``max_bytes`` whether it sends ``Content-Length`` or chunked data. Over the limit the
answer is 413 with OpenAI's error body; a body not complete within ``timeout_s`` of the request's start is
answered 408 (a slow client cannot hold a connection by sending a byte now and then); otherwise the buffered
body is replayed to the app and later ``receive`` calls (disconnect detection) go to the server as usual.

:class:`InternalErrorMiddleware` answers an unhandled exception (a bug) with OpenAI's 500 body itself. Left to
Starlette, the 500 is sent and the exception re-raised to uvicorn, which then closes the connection: a client's
next request on that keep-alive connection would be reset. Here the exception ends with the response.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lopa.server.protocol import error_body

log = logging.getLogger("lopa.server")


class InternalErrorMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:  # half a response is out: only closing the connection can tell the client
                raise
            log.exception("request failed")
            message = f"internal error ({type(exc).__name__}); see the server log"
            body = error_body(message, type_="server_error", code="internal_error")
            await JSONResponse(body, status_code=500)(scope, receive, send)


# the live page (static/) loads only its own files: no inline script or style, no framing by another site
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class SecurityHeadersMiddleware:
    """Adds Content-Security-Policy, X-Frame-Options and X-Content-Type-Options to every HTTP response.

    Paths in ``exempt`` (FastAPI's /docs and /redoc pages, when turned on: they load their assets from a CDN) get
    the last two only.
    """

    def __init__(self, app: ASGIApp, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff")]
        if scope.get("path") not in self.exempt:
            extra.append((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()))

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                await self._too_slow(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return  # the client left before sending its whole body
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_slow(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body did not arrive within {self.timeout_s:g} s; send it at once"
        body = error_body(message, type_="invalid_request_error", code="request_timeout")
        await JSONResponse(body, status_code=408, headers={"Connection": "close"})(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than the server's limit of {self.max_bytes} bytes"
        body = error_body(message, type_="invalid_request_error", code="request_too_large")
        await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)
