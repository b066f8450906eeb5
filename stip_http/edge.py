"""The HTTP edge both services share: body-size bounds, bounded metrics labels, server limits.

No FastAPI here: `BodyLimit` is plain ASGI (it sees every request before routing), and
`serve` runs a service under uvicorn with them (uvicorn is imported only there). What a
request may cost a service before its credential is checked is decided here:

- `BodyLimit` refuses a body past its bound with 413: a declared `Content-Length` before a
  byte is read, a chunked body as soon as the bytes counted pass it. The application then
  sees the client as gone, so nothing buffers the rest.
- `method_label` maps the HTTP method to a fixed set, so invented methods cannot grow the
  metrics without bound (unknown paths are the route template "unmatched" already).
- `serve`: at most `max_connections` connections and requests (uvicorn's
  `limit_concurrency`, 503 past it), idle keep-alive connections closed after `keep_alive_s`,
  a request head (line and headers) of at most `max_header_bytes`, due within
  `header_timeout_s` of the connection or of the previous response: a client that trickles
  its headers, or sends endless ones, is cut.
"""

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("stip.http")

E_TOO_LARGE = "payload_too_large"  # = shared.api.E_TOO_LARGE (not imported: shared.api pulls pydantic models)

# An HTTP method outside this set is counted as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

# The bound of one request's body and the setting that raises it, chosen by path and method.
LimitFor = Callable[[Scope], tuple[int, str]]


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


class BodyLimit:
    """Bounds every request body while it streams (pure ASGI: nothing is buffered here)."""

    def __init__(self, app: ASGIApp, limit_for: LimitFor) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(send, f"request body of {declared} bytes exceeds the limit of {limit} ({setting})")
            return
        received = 0
        answered = False  # the 413 is sent: the application's own answer goes nowhere
        started = False

        async def counted() -> Message:
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    answered = True
                    if not started:
                        await _too_large(send, f"request body exceeds the limit of {limit} bytes ({setting})")
                    return {"type": "http.disconnect"}  # the application stops reading
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not answered:
                raise
            log.debug("%s %s: body over its limit; the application's error is moot", scope["method"], scope["path"])


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server's parser refuses it (400) before the application runs
    return None


async def _too_large(send: Send, message: str) -> None:
    body = json.dumps({"error": {"code": E_TOO_LARGE, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers.append((b"connection", b"close"))  # the rest of the body is never read
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ServerSettings(Protocol):
    """What `serve` reads of a service's settings (CloudSettings and DeveloperSettings have it)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def log_level(self) -> str: ...

    @property
    def tls_certfile(self) -> Path | None: ...

    @property
    def tls_keyfile(self) -> Path | None: ...

    @property
    def max_connections(self) -> int: ...

    @property
    def keep_alive_s(self) -> int: ...

    @property
    def header_timeout_s(self) -> float: ...

    @property
    def max_header_bytes(self) -> int: ...


def serve(app: Any, settings: ServerSettings) -> None:
    """Run a service's app under uvicorn with its bind address, TLS and the bounds above (blocks)."""
    import uvicorn

    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
        ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None,
        timeout_graceful_shutdown=30,
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_s,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        http=_bounded_head_protocol(settings.header_timeout_s, settings.max_header_bytes),
    )


def _bounded_head_protocol(timeout_s: float, max_bytes: int) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with each request head bounded.

    uvicorn itself times out only idle keep-alive connections: a connection that sends part of
    a request line, or one header a minute, holds its descriptor forever, and with httptools
    nothing bounds the size of the headers. Here the head must be complete within `timeout_s`
    of the connection opening or of the previous response, and within `max_bytes`; otherwise
    the connection is closed.
    """
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    base: Any = AutoHTTPProtocol

    class BoundedHeadProtocol(base):  # type: ignore[misc]
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            in_head = not self._in_request()
            super().data_received(data)
            if in_head and not self._in_request():  # these bytes did not complete the head
                self._head_bytes += len(data)
                if self._head_bytes > max_bytes and not self.transport.is_closing():
                    self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            """A request head has arrived and its response is not complete yet."""
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            if not self._in_request() and not self.transport.is_closing():
                self.transport.close()

    return BoundedHeadProtocol


class UnexpectedErrors:
    """Answer an exception that escaped the routes with the service's own 500, and stop it there.

    Starlette's handler for `Exception` sends its answer and then re-raises to the server, and
    uvicorn with httptools closes the connection on that: the client then reads a connection
    reset instead of the 500. Mounted inside the metrics middleware, so a 500 is counted."""

    def __init__(self, app: ASGIApp, respond: Callable[[Scope, Exception], Any]) -> None:
        self.app, self.respond = app, respond  # respond(scope, exc) -> an ASGI response (logs it)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:  # half an answer is out: nothing sound can follow it on this connection
                raise
            await (await self.respond(scope, exc))(scope, receive, send)
