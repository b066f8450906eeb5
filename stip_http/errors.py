"""One error shape and one table from exception to HTTP status and code, for both services.

Every error leaves as `{"error": {"code", "message"}}` (shared.api.ErrorResponse). Domain
exceptions derive from a kind of `stip_http.kinds`; the core's (shared.errors) are listed by
class. FastAPI's validation errors and Starlette's 404/405 are rewritten to the same shape, and
an exception no row matches is a 500 whose message names only where to look.
"""

import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from shared import api
from shared.api import ErrorBody, ErrorResponse
from shared.errors import (
    BadTensor,
    CheckpointError,
    CredentialError,
    KeyFormatError,
    PayloadTooLarge,
    StipCoreError,
    UnsupportedModel,
)
from stip_http import kinds
from stip_http.edge import UnexpectedErrors

log = logging.getLogger("stip.http")

# The one place that turns an exception into a status and a code: first match wins.
ERRORS: tuple[tuple[type[BaseException], int, str], ...] = (
    (kinds.BadInput, 400, api.E_BAD_INPUT),
    (ClientDisconnect, 400, api.E_BAD_INPUT),  # a body cut off midway (a push or a forward)
    (kinds.Unauthorized, 401, api.E_UNAUTHORIZED),
    (kinds.Forbidden, 403, api.E_FORBIDDEN),
    (kinds.NotFound, 404, api.E_NOT_FOUND),
    (kinds.KeyOutdated, 409, api.E_KEY_OUTDATED),
    (kinds.Conflict, 409, api.E_CONFLICT),
    (kinds.SessionExpired, 410, api.E_SESSION_EXPIRED),
    (kinds.TooManySessions, 429, api.E_TOO_MANY_SESSIONS),
    (kinds.TooManyRequests, 429, api.E_TOO_MANY_REQUESTS),
    (kinds.ResponseTooLarge, 422, api.E_TOO_LARGE),
    (kinds.NotReady, 503, api.E_NOT_READY),
    (kinds.Internal, 500, api.E_INTERNAL),
    (PayloadTooLarge, 413, api.E_TOO_LARGE),  # before BadTensor, its base
    (BadTensor, 400, api.E_BAD_INPUT),
    (CredentialError, 401, api.E_UNAUTHORIZED),
    (CheckpointError, 400, api.E_BAD_INPUT),
    (UnsupportedModel, 422, api.E_BAD_INPUT),  # well-formed, but not a model this project serves
    (KeyFormatError, 400, api.E_BAD_INPUT),
)

# The code of a status that Starlette or a route raised as an HTTPException.
HTTP_CODES = {
    400: api.E_BAD_INPUT,
    401: api.E_UNAUTHORIZED,
    403: api.E_FORBIDDEN,
    404: api.E_NOT_FOUND,
    405: api.E_METHOD_NOT_ALLOWED,
    413: api.E_TOO_LARGE,
    503: api.E_NOT_READY,
}


def documented(statuses: Iterable[int]) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a router: these error statuses, each with the error shape."""
    return {status: {"model": ErrorResponse} for status in statuses}


def status_of(exc: BaseException) -> tuple[int, str]:
    for kind, status, code in ERRORS:
        if isinstance(exc, kind):
            return status, code
    return 500, api.E_INTERNAL


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code, message=message))
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


Handler = Callable[[Request, Exception], Coroutine[Any, Any, JSONResponse]]


def install_error_handlers(app: FastAPI, domain: Iterable[type[Exception]], *, log_hint: str) -> None:
    """Map `domain` (the service's error base, the core's) and every other exception to the one
    shape; `log_hint` ends the message of a 500 ("see P1's log")."""

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
        return error_response(500, api.E_INTERNAL, f"internal error; {log_hint}")

    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        status, code = status_of(exc)
        if status == 500 and not isinstance(exc, kinds.Internal):  # not meant for the caller
            return await unexpected(request, exc)
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        log.info("%s %s -> %d %s: %s", request.method, request.url.path, status, code, message)
        return error_response(status, code, message)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        problems = []
        # location and reason only: pydantic's `input` could echo what the client sent
        for e in exc.errors() if isinstance(exc, RequestValidationError) else ():
            where = ".".join(str(part) for part in e.get("loc", ()) if part != "body")
            problems.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
        return error_response(422, api.E_BAD_INPUT, "invalid request: " + ("; ".join(problems) or "unreadable"))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, StarletteHTTPException):
            return await unexpected(request, exc)
        status = exc.status_code
        code = HTTP_CODES.get(status, api.E_INTERNAL if status >= 500 else api.E_BAD_INPUT)
        message = exc.detail if isinstance(exc.detail, str) and exc.detail else "error"
        if status == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(status, code, message, headers=getattr(exc, "headers", None))

    for kind in domain:
        app.add_exception_handler(kind, domain_error)
    app.add_exception_handler(StipCoreError, domain_error)
    app.add_exception_handler(ClientDisconnect, domain_error)  # an ordinary event, not a 500 with a traceback
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_middleware(UnexpectedErrors, respond=lambda scope, exc: unexpected(Request(scope), exc))  # inside metrics
