"""`create_app(settings)`: P2's FastAPI application.

The lifespan builds the service, prepares the data directory (failing loudly when it cannot),
then reloads the active deployments in the background: `/health/live` answers at once,
`/health/ready` and the `/v1` routes answer 503 until every deployment is loaded. A second
background task ends idle sessions.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from cloud_service.admission import Admission
from cloud_service.api import body_limit, install_error_handlers, router
from cloud_service.metrics import Metrics
from cloud_service.service import CloudService
from cloud_service.sessions import Clock
from cloud_service.settings import CloudSettings, load_settings
from stip_http.edge import BodyLimit
from stip_http.metrics import RequestMetrics

log = logging.getLogger("stip.cloud")


def create_app(settings: CloudSettings | None = None, *, clock: Clock = time.monotonic) -> FastAPI:
    """The P2 application. `clock` (monotonic seconds) is injectable for session expiry tests."""
    settings = settings or load_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = CloudService(settings, metrics=metrics, clock=clock)
        app.state.service = service
        # deployment id -> the worker threads its forwards may use (api.forward_limiter)
        app.state.forward_limiters = {}
        app.state.admission = Admission(settings)  # per-user forwards, body slots (admission.py)
        service.prepare()
        if settings.push_token is None:
            log.warning("STIP_CLOUD_PUSH_TOKEN is not set: weight pushes are refused")
        log.info("P2 on %s (%s), data in %s", service.device, settings.dtype, settings.data_dir)
        tasks = [
            asyncio.create_task(_load(service), name="stip-cloud-reload"),
            asyncio.create_task(_sweep(service), name="stip-cloud-sessions"),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await asyncio.to_thread(service.close)  # engine processes (vLLM servers) end with P2

    app = FastAPI(
        title="STIP cloud (P2)",
        summary="Runs transformed weights θ′ on permuted inputs; never sees a permutation or token.",
        version="1",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(BodyLimit, limit_for=body_limit(settings))
    app.add_middleware(RequestMetrics, record=metrics.record_request)  # outermost: counts the 413s of BodyLimit too
    return app


async def _load(service: CloudService) -> None:
    try:
        await service.start()
    except Exception:
        log.exception("reloading the deployments failed; P2 stays not ready")


async def _sweep(service: CloudService) -> None:
    interval = max(1.0, min(30.0, service.sessions.idle_ttl_s / 4))
    while True:
        await asyncio.sleep(interval)
        n = service.sessions.evict_expired()
        if n:
            log.info("%d idle session(s) expired", n)
