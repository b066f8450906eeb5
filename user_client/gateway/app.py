"""`create_app(settings)`: the gateway's FastAPI application.

The lifespan builds the `Gateway` (one SDK client per model) and closes it on shutdown. Every
error leaves as OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from user_client.gateway.api import router
from user_client.gateway.service import ClientFactory, Gateway, GatewayError
from user_client.gateway.settings import GatewaySettings

log = logging.getLogger("stip.gateway")


def create_app(settings: GatewaySettings, *, client_factory: ClientFactory | None = None) -> FastAPI:
    """The app for `settings`; `client_factory` builds each model's `StipClient` (tests inject one)."""
    specs = settings.models()  # configuration errors surface here, before serving
    api_key = settings.resolved_api_key()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = Gateway(specs, client_factory=client_factory)
        app.state.gateway = gateway
        log.info("gateway serving %s", ", ".join(gateway.models))
        threading.Thread(target=gateway.warm, name="stip-gateway-warm", daemon=True).start()
        try:
            yield
        finally:
            gateway.close()

    app = FastAPI(title="STIP gateway (OpenAI-compatible)", version="0.1.0", lifespan=lifespan)
    app.state.api_key = api_key
    app.include_router(router)

    @app.get("/health/live")
    @app.get("/health/ready")  # the models' clients exist once the lifespan has run
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        err = GatewayError(400, message, param=loc[0] if loc else None)
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = GatewayError(exc.status_code, str(exc.detail), code=code)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("gateway: unexpected error")
        err = GatewayError(500, f"internal error in the gateway: {type(exc).__name__}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    return app
