"""`create_app(settings)`: P1's FastAPI application.

The lifespan builds the `DeveloperService` (state, signing key, HTTP client to P2),
recovers interrupted jobs, and on shutdown stops running jobs at their next checkpoint.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from developer_service.api import install_error_handlers, router
from developer_service.metrics import Metrics
from developer_service.service import DeveloperService
from developer_service.settings import DeveloperSettings, load_settings
from stip_http.edge import BodyLimit
from stip_http.metrics import RequestMetrics


def create_app(
    settings: DeveloperSettings | None = None,
    *,
    transport: httpx.BaseTransport | None = None,
) -> FastAPI:
    """P1's app. `transport` replaces the network for the pushes to P2 (tests: a fake P2)."""
    settings = settings or load_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await run_in_threadpool(DeveloperService, settings, transport=transport, metrics=metrics)
        app.state.service = service
        await run_in_threadpool(service.start)
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    app = FastAPI(
        title="STIP developer service (P1)",
        summary="Model registry, key generation, transform, push of θ′ to P2, user keys.",
        version="1",
        lifespan=lifespan,
    )
    # every body is JSON and small: bounded while it streams, before FastAPI buffers it
    limit = (settings.max_body_bytes, "STIP_DEVELOPER_MAX_BODY_BYTES")
    install_error_handlers(app)  # its catch-all layer first: inside BodyLimit and the metrics
    app.add_middleware(BodyLimit, limit_for=lambda scope: limit)
    app.add_middleware(RequestMetrics, record=metrics.record_request)  # outermost: counts the 413s of BodyLimit too
    app.include_router(router)
    return app
