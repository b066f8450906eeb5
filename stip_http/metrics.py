"""The request metrics middleware both services mount outermost (pure ASGI: bodies stream through).

Labels stay bounded: the method by `method_label` ("other" outside the standard ones), the route
template, never the raw path ("unmatched" for unknown paths), and the status. What is counted
and under which metric names is each service's own (`record`).
"""

import time
from typing import Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stip_http.edge import method_label


class Record(Protocol):
    def __call__(self, *, method: str, route: str, status: int, headers_s: float | None, total_s: float) -> None:
        """One finished request: seconds to its response headers (None: none were sent) and in all."""


def route_label(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestMetrics:
    """Times every HTTP request and hands its bounded labels to `record` once it ends."""

    def __init__(self, app: ASGIApp, record: Record) -> None:
        self.app, self.record = app, record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()
        headers_s: float | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status, headers_s
            if message["type"] == "http.response.start":
                status = message["status"]
                headers_s = time.perf_counter() - start
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.record(
                method=method_label(scope.get("method", "")),
                route=route_label(scope),
                status=status,
                headers_s=headers_s,
                total_s=time.perf_counter() - start,
            )
