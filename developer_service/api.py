"""P1's HTTP routes (PROTOCOL.md section 4); stip_http.errors maps their errors to statuses.

Routes are plain `def`: FastAPI runs them in its thread pool, so file I/O never blocks
the event loop; transforms and pushes run in the service's own job threads.
"""

import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response, status
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from developer_service import errors, schemas
from developer_service.bundle import MEDIA_TYPE
from developer_service.metrics import CONTENT_TYPE_LATEST
from developer_service.service import DeveloperService
from shared import api as contract
from shared.credentials import Claims
from stip_http.errors import documented
from stip_http.errors import install_error_handlers as install_errors

log = logging.getLogger("stip.developer.api")


def install_error_handlers(app: FastAPI) -> None:
    install_errors(app, (errors.DeveloperError,), log_hint="see P1's log")


# --- dependencies --------------------------------------------------------------------------


def get_service(request: Request) -> DeveloperService:
    service: DeveloperService = request.app.state.service
    return service


ServiceDep = Annotated[DeveloperService, Depends(get_service)]


def bearer_token(authorization: Annotated[str | None, Header()] = None) -> str | None:
    """The token of `Authorization: Bearer <token>`, or None when absent."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.Unauthorized("the Authorization header must read 'Bearer <token>'")
    return token.strip()


TokenDep = Annotated[str | None, Depends(bearer_token)]


def require_admin(service: ServiceDep, token: TokenDep) -> None:
    service.authenticate_admin(token)


def require_user(deployment_id: str, service: ServiceDep, token: TokenDep) -> Claims:
    return service.authenticate_user(deployment_id, token)


AdminDep = Annotated[None, Depends(require_admin)]
UserDep = Annotated[Claims, Depends(require_user)]


class AdminFirst(APIRoute):
    """A route with a JSON body whose admin token is checked before the body is read.

    FastAPI reads and parses a body before it solves `Depends(...)`: without this an anonymous
    client makes P1 receive and parse whatever it sends (bounded by STIP_DEVELOPER_MAX_BODY_BYTES
    as well). The route's `AdminDep` checks the token again, which costs a comparison.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def admin_first(request: Request) -> Response:
            get_service(request).authenticate_admin(bearer_token(request.headers.get("authorization")))
            return await handler(request)

        return admin_first


ERRORS = documented((400, 401, 403, 404, 409, 413, 422, 503))

router = APIRouter(responses=ERRORS)
admin_json = APIRouter(responses=ERRORS, route_class=AdminFirst)  # the routes with a body; included below

# --- models --------------------------------------------------------------------------------


@admin_json.post(
    contract.MODELS_PATH,
    status_code=status.HTTP_201_CREATED,
    tags=["models"],
    responses={200: {"model": schemas.ModelInfo, "description": "already registered (same path and name)"}},
)
def register_model(
    body: schemas.RegisterModel, service: ServiceDep, _: AdminDep, response: Response
) -> schemas.ModelInfo:
    """Register a local Hugging Face model directory (idempotent on path and name)."""
    info, created = service.register_model(body)
    if not created:
        response.status_code = status.HTTP_200_OK
    return info


@router.get(contract.MODELS_PATH, tags=["models"])
def list_models(service: ServiceDep, _: AdminDep) -> list[schemas.ModelInfo]:
    return service.models()


@router.get(contract.MODEL_PATH, tags=["models"])
def get_model(model_id: str, service: ServiceDep, _: AdminDep) -> schemas.ModelInfo:
    return service.model(model_id)


@router.delete(contract.MODEL_PATH, tags=["models"])
def delete_model(model_id: str, service: ServiceDep, _: AdminDep) -> schemas.DeletedModel:
    """Unregister a model no deployment uses (409 names them); the directory stays on disk."""
    return service.delete_model(model_id)


# --- deployments ---------------------------------------------------------------------------


@admin_json.post(contract.DEPLOYMENTS_PATH, status_code=status.HTTP_202_ACCEPTED, tags=["deployments"])
def create_deployment(
    body: schemas.CreateDeployment, service: ServiceDep, _: AdminDep, response: Response
) -> schemas.DeploymentStatus:
    """Draw key version 1, transform, push θ′ to P2; poll the deployment for progress."""
    result = service.create_deployment(body)
    response.headers["Location"] = contract.path(contract.DEPLOYMENT_PATH, deployment_id=result.deployment_id)
    return result


@router.get(contract.DEPLOYMENTS_PATH, tags=["deployments"])
def list_deployments(service: ServiceDep, _: AdminDep) -> list[schemas.DeploymentStatus]:
    return service.deployments()


@router.get(contract.DEPLOYMENT_PATH, tags=["deployments"])
def get_deployment(deployment_id: str, service: ServiceDep, _: AdminDep) -> schemas.DeploymentStatus:
    return service.deployment(deployment_id)


@router.delete(contract.DEPLOYMENT_PATH, tags=["deployments"])
def delete_deployment(deployment_id: str, service: ServiceDep, _: AdminDep) -> schemas.DeletedDeployment:
    """Delete keys, versions and credentials on P1, θ′ and sessions on P2 (in the background if P2 is down)."""
    return service.delete_deployment(deployment_id)


@router.post(contract.ROTATE_PATH, status_code=status.HTTP_202_ACCEPTED, tags=["deployments"])
def rotate(deployment_id: str, service: ServiceDep, _: AdminDep) -> schemas.DeploymentStatus:
    """New key set and θ′; users get the old version until P2 has activated the new one."""
    return service.rotate(deployment_id)


# --- users -----------------------------------------------------------------------------------


@admin_json.post(contract.USERS_PATH, status_code=status.HTTP_201_CREATED, tags=["users"])
def issue_credential(
    deployment_id: str,
    service: ServiceDep,
    _: AdminDep,
    response: Response,
    body: schemas.IssueCredential | None = None,
) -> schemas.CredentialIssued:
    """A signed user credential for this deployment; P1 keeps only its hash."""
    response.headers["Cache-Control"] = "no-store"
    return service.issue_credential(deployment_id, body or schemas.IssueCredential.model_validate({}))


@router.get(contract.USERS_PATH, tags=["users"])
def list_credentials(deployment_id: str, service: ServiceDep, _: AdminDep) -> list[schemas.CredentialInfo]:
    return service.credentials(deployment_id)


@router.delete(contract.USER_PATH, tags=["users"])
def revoke_credential(deployment_id: str, user_id: str, service: ServiceDep, _: AdminDep) -> schemas.CredentialInfo:
    """P1 stops handing this user the key. P2 checks credentials offline, up to their expiry."""
    return service.revoke_credential(deployment_id, user_id)


@router.get(
    contract.USER_KEY_PATH,
    tags=["users"],
    response_class=StreamingResponse,
    responses={200: {"content": {MEDIA_TYPE: {}}, "description": "the user bundle (tar)"}},
)
def user_key(deployment_id: str, service: ServiceDep, claims: UserDep) -> StreamingResponse:
    """The user bundle of the active key version: π, π_c, embedding module, tokenizer, config."""
    bundle = service.user_bundle(deployment_id)
    log.info("deployment %s: user %s fetched key version %d", deployment_id, claims.sub, bundle.manifest.key_version)
    headers = {
        contract.KEY_VERSION_HEADER: str(bundle.manifest.key_version),
        contract.FINGERPRINT_HEADER: bundle.manifest.fingerprint,
        "Content-Length": str(bundle.size),
        "Content-Disposition": f'attachment; filename="{bundle.filename}"',
        "Cache-Control": "no-store",
    }
    return StreamingResponse(bundle.chunks(), media_type=MEDIA_TYPE, headers=headers)


# --- health and metrics ------------------------------------------------------------------------


@router.get(contract.HEALTH_LIVE_PATH, tags=["health"])
def live() -> schemas.Health:
    return schemas.Health(status="ok")


@router.get(contract.HEALTH_READY_PATH, tags=["health"], responses={503: {"model": schemas.Health}})
def ready(request: Request) -> Response:
    service: DeveloperService | None = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        return JSONResponse(schemas.Health(status="not_ready").model_dump(), status_code=503)
    return JSONResponse(schemas.Health(status="ready").model_dump())


@router.get(
    contract.METRICS_PATH,
    tags=["health"],
    response_class=Response,
    responses={200: {"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)


router.include_router(admin_json)
