"""The gateway's routes: a few lines each; the logic is in `service`."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Generator
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from user_client.gateway import schemas as s
from user_client.gateway.service import Gateway, GatewayError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


def _api_key(request: Request) -> None:
    """With a gateway API key configured, every /v1 route needs `Authorization: Bearer <key>`."""
    expected: str | None = request.app.state.api_key
    if expected is None:
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected.encode()):
        raise GatewayError(
            401,
            "Incorrect API key provided: this gateway needs its own key (STIP_GATEWAY_API_KEY) as the bearer token",
            code="invalid_api_key",
        )


GatewayDep = Annotated[Gateway, Depends(_gateway)]
router = APIRouter(prefix="/v1", dependencies=[Depends(_api_key)])


def _sse(request: Request, events: Generator[str, None, None]) -> StreamingResponse:
    return StreamingResponse(_until_disconnect(request, events), media_type="text/event-stream", headers=SSE_HEADERS)


async def _until_disconnect(request: Request, events: Generator[str, None, None]) -> AsyncIterator[str]:
    """Each event computed in a worker thread; a client that went away stops the generation
    (closing `events` deletes its P2 session) instead of leaving it to run to its end."""
    try:
        while not await request.is_disconnected():
            event = await anyio.to_thread.run_sync(next, events, None)
            if event is None:
                return
            yield event
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(events.close)


@router.get("/models")
def list_models(gateway: GatewayDep) -> s.ModelList:
    return gateway.list_models()


@router.get("/models/{name}")
def get_model(name: str, gateway: GatewayDep) -> s.ModelCard:
    return gateway.model(name).card()


@router.post("/completions", response_model=None)
def completions(req: s.CompletionRequest, gateway: GatewayDep, request: Request) -> s.Completion | StreamingResponse:
    return _sse(request, gateway.completion_stream(req)) if req.stream else gateway.completion(req)


@router.post("/chat/completions", response_model=None)
def chat_completions(
    req: s.ChatCompletionRequest, gateway: GatewayDep, request: Request
) -> s.ChatCompletion | StreamingResponse:
    return _sse(request, gateway.chat_stream(req)) if req.stream else gateway.chat(req)


@router.post("/embeddings")
def embeddings(req: s.EmbeddingRequest, gateway: GatewayDep) -> s.EmbeddingList:
    return gateway.embeddings(req)
