"""P2's HTTP routes (a few lines each) and their dependencies.

Every error leaves as `{"error": {"code", "message"}}`: stip_http.errors maps the exceptions of
cloud_service.errors and shared.errors to statuses in its one table.
"""

import logging
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Scope

from cloud_service import generation
from cloud_service.admission import Admission, check_response_size
from cloud_service.errors import (
    BadInput,
    CloudError,
    NotReady,
)
from cloud_service.schemas import DeploymentInfo, ForwardOptions, Health, LoadProgress, PushResult, SessionCreated
from cloud_service.service import CloudService, Deployment
from cloud_service.settings import CloudSettings
from shared.api import (
    DEPLOYMENT_PATH,
    DIGEST_HEADER,
    FORWARD_PATH,
    GENERATE_PATH,
    HEALTH_LIVE_PATH,
    HEALTH_READY_PATH,
    KEY_VERSION_HEADER,
    METRICS_PATH,
    PUSH_PATH,
    REVOCATIONS_PATH,
    SESSION_PATH,
    SESSIONS_PATH,
    DeploymentDeleted,
    GenerateResult,
    OutputMode,
    Revocations,
    RevocationsResult,
)
from shared.credentials import Claims
from shared.errors import (
    PayloadTooLarge,
)
from shared.wire import CONTENT_TYPE
from stip_http.edge import LimitFor
from stip_http.errors import documented
from stip_http.errors import install_error_handlers as install_errors

log = logging.getLogger("stip.cloud.api")


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\{\w+\}", "[^/]+", template))


_STREAMED = {  # the two bodies read from the raw stream, each with its own bound
    ("PUT", _pattern(PUSH_PATH)): ("max_push_bytes", "STIP_CLOUD_MAX_PUSH_BYTES"),
    ("POST", _pattern(FORWARD_PATH)): ("max_body_bytes", "STIP_CLOUD_MAX_BODY_BYTES"),
}


def body_limit(settings: CloudSettings) -> LimitFor:
    """The bound of each request's body (stip_http.edge.BodyLimit): a push and a forward have
    their own; every other body is JSON, bounded by STIP_CLOUD_MAX_JSON_BYTES."""

    def limit_for(scope: Scope) -> tuple[int, str]:
        for (method, pattern), (field, setting) in _STREAMED.items():
            if scope["method"] == method and pattern.fullmatch(scope["path"]):
                return getattr(settings, field), setting
        return settings.max_json_bytes, "STIP_CLOUD_MAX_JSON_BYTES"

    return limit_for


ERROR_RESPONSES = documented((400, 401, 403, 404, 409, 410, 413, 422, 429, 503))


def install_error_handlers(app: FastAPI) -> None:
    install_errors(app, (CloudError,), log_hint="see the service log")


# --- dependencies --------------------------------------------------------------------------
# All `async def`: they never block, and a sync dependency would queue behind forwards for a
# worker thread (health checks too).


async def get_service(request: Request) -> CloudService:
    service: CloudService = request.app.state.service
    return service


ServiceDep = Annotated[CloudService, Depends(get_service)]


async def require_ready(service: ServiceDep) -> None:
    if not service.ready:
        raise NotReady("P2 is still loading its deployments; retry shortly")


AuthorizationHeader = Annotated[str | None, Header()]


async def bearer_token(authorization: AuthorizationHeader = None) -> str | None:
    """The token of `Authorization: Bearer <token>`, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


TokenDep = Annotated[str | None, Depends(bearer_token)]


async def get_deployment(deployment_id: str, service: ServiceDep) -> Deployment:
    return service.deployment(deployment_id)


DeploymentDep = Annotated[Deployment, Depends(get_deployment)]


@dataclass(frozen=True)
class Caller:
    """A user's request to one deployment, admitted: the service, the deployment, the claims."""

    service: CloudService
    dep: Deployment
    claims: Claims


# The user routes resolve readiness, deployment and credential in ONE dependency of two
# parameters: FastAPI solves each dependency node and extracts each declared parameter anew on
# every request, and forward's former chain (router readiness, service, deployment, token,
# claims: 11 nodes, 44 parameter extractions) was most of P2's event-loop time per decode step
# outside the model. The checks and their order are unchanged: 503 not ready, 404 unknown
# deployment, 401/403 credential, and only then the route's own headers and query (422).


async def _admit(request: Request, deployment_id: str, authorization: str | None, session_id: str | None) -> Caller:
    service: CloudService = request.app.state.service
    await require_ready(service)
    dep = service.deployment(deployment_id)
    token = await bearer_token(authorization)
    return Caller(service, dep, service.authorize_step(dep, token, session_id))


async def user_caller(request: Request, deployment_id: str, authorization: AuthorizationHeader = None) -> Caller:
    """The user credential's caller."""
    return await _admit(request, deployment_id, authorization, None)


async def step_caller(request: Request, deployment_id: str, authorization: AuthorizationHeader = None) -> Caller:
    """The caller of a forward: the user credential, or the token of the forward's session.

    `session_id` is read here as sent (an overlong one matches no session: 401); the route
    validates it, after the credential, like its other parameters.
    """
    return await _admit(request, deployment_id, authorization, request.query_params.get("session_id"))


UserDep = Annotated[Caller, Depends(user_caller)]
StepDep = Annotated[Caller, Depends(step_caller)]
KeyVersionHeader = Annotated[int | None, Header(alias=KEY_VERSION_HEADER, ge=1)]
DigestHeader = Annotated[str | None, Header(alias=DIGEST_HEADER)]


def content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        raise BadInput("Content-Length is not an integer") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes."""
    declared = content_length(request)
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)  # the one copy of the body


def forward_limiter(request: Request, dep: Deployment) -> anyio.CapacityLimiter:
    """The worker threads that parse one deployment's large forward bodies (STIP_CLOUD_FORWARD_THREADS).

    The forwards themselves run in the deployment's scheduler thread (cloud_service.batching);
    the bound keeps waiting requests out of threads. Every thread that enters torch keeps its
    own allocator arena and OpenMP team: under 32 clients (benchmarks/load.py), anyio's shared
    pool of 40 threads grew P2 by about 370 MiB that stayed; two threads per deployment by
    about 60. One limiter per deployment also keeps a busy deployment from starving the others'
    requests of threads.
    """
    limiters: dict[str, anyio.CapacityLimiter] = request.app.state.forward_limiters
    limiter = limiters.get(dep.deployment_id)
    if limiter is None:  # created in the event loop, which is the only thread that reads the dict
        limiter = limiters[dep.deployment_id] = anyio.CapacityLimiter(request.app.state.settings.forward_threads)
    return limiter


# --- routes --------------------------------------------------------------------------------

# Bodies of forward and push are read from the raw stream, so FastAPI cannot infer them: the
# spec states them here (safetensors, shared.wire), as it does the non-JSON answers.
BINARY = {"schema": {"type": "string", "format": "binary"}}
METRICS_RESPONSE: dict[int | str, dict[str, object]] = {
    200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
}


def safetensors_body(description: str) -> dict[str, object]:
    return {"requestBody": {"required": True, "description": description, "content": {CONTENT_TYPE: BINARY}}}


router = APIRouter(responses=ERROR_RESPONSES)
v1 = APIRouter(dependencies=[Depends(require_ready)], responses=ERROR_RESPONSES)
users = APIRouter(responses=ERROR_RESPONSES)  # the user routes: readiness checked by their one dependency


async def push_authorized(service: ServiceDep, token: TokenDep) -> None:
    """P1's push token, checked before the body is validated."""
    service.authorize_push(token)


class PushTokenFirst(APIRoute):
    """A route with a JSON body whose push token is checked before the body is read.

    FastAPI reads and parses a body before it solves `Depends(...)`: without this an anonymous
    client makes P2 receive and parse whatever it sends (bounded by STIP_CLOUD_MAX_JSON_BYTES as
    well). The route's own `push_authorized` checks the token again, which costs a comparison.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def push_token_first(request: Request) -> Response:
            await push_authorized(await get_service(request), await bearer_token(request.headers.get("authorization")))
            return await handler(request)

        return push_token_first


push_json = APIRouter(responses=ERROR_RESPONSES, route_class=PushTokenFirst)  # included into v1 below


@v1.put(
    PUSH_PATH,
    response_model=PushResult,
    tags=["P1 -> P2"],
    dependencies=[Depends(push_authorized)],
    openapi_extra=safetensors_body("θ′ as one safetensors body; its metadata names deployment, key version, config"),
)
async def push_weights(
    deployment_id: str,
    request: Request,
    service: ServiceDep,
    digest: DigestHeader = None,
    key_version: KeyVersionHeader = None,
) -> PushResult:
    """Receive θ′ as one streamed safetensors body; activate it when complete and verified."""
    return await service.push(
        deployment_id,
        request.stream(),
        digest=digest,
        content_length=content_length(request),
        key_version=key_version,
        sender_gone=request.is_disconnected,
    )


@v1.get(PUSH_PATH, response_model=LoadProgress, tags=["P1 -> P2"], dependencies=[Depends(push_authorized)])
async def push_progress(deployment_id: str, service: ServiceDep) -> LoadProgress:
    """Where the push P2 is installing stands, after its last byte (404 when none is)."""
    return service.push_progress(deployment_id)


@push_json.put(
    REVOCATIONS_PATH,
    response_model=RevocationsResult,
    tags=["P1 -> P2"],
    dependencies=[Depends(push_authorized)],
)
async def put_revocations(deployment_id: str, body: Revocations, service: ServiceDep) -> RevocationsResult:
    """Replace the deployment's revoked credentials: P2 refuses them (401) until they expire."""
    return await anyio.to_thread.run_sync(service.set_revocations, deployment_id, body)


@v1.delete(
    DEPLOYMENT_PATH,
    response_model=DeploymentDeleted,
    tags=["P1 -> P2"],
    dependencies=[Depends(push_authorized)],
)
async def delete_deployment(deployment_id: str, service: ServiceDep) -> DeploymentDeleted:
    """Remove θ′ and end the deployment's sessions (P1 deleted the deployment)."""
    return await service.delete_deployment(deployment_id)


@v1.get(DEPLOYMENT_PATH, response_model=DeploymentInfo, tags=["public"])
async def deployment_info(dep: DeploymentDep) -> DeploymentInfo:
    return dep.info()


@users.post(SESSIONS_PATH, response_model=SessionCreated, status_code=201, tags=["P3 -> P2"])
async def create_session(caller: UserDep, key_version: KeyVersionHeader = None) -> SessionCreated:
    """A session (a KV cache on P2) and its token, which its forward steps may send instead of the credential."""
    caller.service.check_key_version(caller.dep, key_version)
    return caller.service.create_session(caller.dep, caller.claims)


@v1.delete(SESSION_PATH, status_code=204, response_class=Response, tags=["P3 -> P2"])
async def delete_session(session_id: str, service: ServiceDep, token: TokenDep) -> Response:
    service.delete_session(session_id, token)
    return Response(status_code=204)


@users.post(
    FORWARD_PATH,
    response_class=Response,
    tags=["P3 -> P2"],
    openapi_extra=safetensors_body("inputs_embeds [B, S, d] permuted by π, optional attention_mask [B, S]"),
    responses={200: {"description": "safetensors: the permuted outputs", "content": {CONTENT_TYPE: BINARY}}},
)
async def forward(
    request: Request,
    caller: StepDep,
    key_version: KeyVersionHeader = None,
    session_id: Annotated[str | None, Query(max_length=128)] = None,
    output: OutputMode = "all",
    k: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    """safetensors in (`inputs_embeds` permuted by π), safetensors out (permuted outputs).

    A step of a session may authenticate with the session's token instead of the credential."""
    service, dep, claims = caller.service, caller.dep, caller.claims
    service.check_key_version(dep, key_version)
    options = ForwardOptions(output=output, k=k, session_id=session_id)
    admission: Admission = request.app.state.admission
    size = content_length(request)  # its share of the body budget (admission.py)
    async with admission.forward(dep.deployment_id, claims.sub, size):  # before the body is read
        body = await read_body(request, service.settings.max_body_bytes)
        check_response_size(dep, body, options, service.settings.max_response_bytes)
        result = await service.forward_async(dep, body, options, claims, limiter=forward_limiter(request, dep))
    return Response(result.body, media_type=CONTENT_TYPE, headers={KEY_VERSION_HEADER: str(result.key_version)})


@users.post(
    GENERATE_PATH,
    response_model=GenerateResult,
    tags=["P3 -> P2"],
    openapi_extra=generation.OPENAPI,
    responses=generation.RESPONSES,
)
async def generate(request: Request, caller: UserDep, key_version: KeyVersionHeader = None) -> Response:
    """Token mode: ids relabelled by π_c in (JSON), relabelled ids out (JSON, or events with stream=true)."""
    service, dep = caller.service, caller.dep
    service.check_key_version(dep, key_version)
    body = await read_body(request, generation.MAX_BODY_BYTES)  # read only once the credential is checked
    req = generation.parse(body, dep, service)
    headers = {KEY_VERSION_HEADER: str(dep.key_version)}
    if req.stream:
        return StreamingResponse(
            generation.events(service, dep, req), media_type=generation.SSE_MEDIA_TYPE, headers=headers
        )
    limiter = forward_limiter(request, dep)
    result = await anyio.to_thread.run_sync(generation.run, service, dep, req, limiter=limiter)
    return JSONResponse(result.model_dump(), headers=headers)


@router.get(HEALTH_LIVE_PATH, response_model=Health, tags=["health"])
async def live() -> Health:
    return Health(status="live")


@router.get(HEALTH_READY_PATH, response_model=Health, tags=["health"])
async def ready(service: ServiceDep) -> Health:
    await require_ready(service)
    return Health(status="ready", deployments=service.deployment_count)


@router.get(METRICS_PATH, response_class=Response, tags=["health"], responses=METRICS_RESPONSE)
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)


v1.include_router(push_json)
router.include_router(v1)
router.include_router(users)
