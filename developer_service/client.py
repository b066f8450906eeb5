"""A small admin client for P1's HTTP API (what the `stip-developer` client subcommands use).

Example::

    with DeveloperAdminClient("http://127.0.0.1:8001", admin_token=...) as p1:
        model = p1.register("/models/llama")
        dep = p1.deploy(model.model_id, cloud_url="http://cloud:8002")
        dep = p1.wait(dep.deployment_id)
        cred = p1.issue_credential(dep.deployment_id, name="alice")
"""

import ssl
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from developer_service import schemas
from shared import api

T = TypeVar("T")


class ClientError(Exception):
    """P1 refused a request or could not be reached; `code` is P1's error code, if any."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


class DeveloperAdminClient:
    def __init__(
        self,
        url: str,
        *,
        admin_token: str,
        timeout_s: float = 60.0,
        ca_bundle: Path | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        verify: ssl.SSLContext | bool = True
        if ca_bundle is not None:
            verify = ssl.create_default_context(cafile=str(ca_bundle))
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {admin_token}"},
            timeout=timeout_s,
            verify=verify,
            transport=transport,
        )

    def __enter__(self) -> "DeveloperAdminClient":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, out: Any, body: BaseModel | None = None) -> Any:
        try:
            response = self._http.request(
                method, path, json=None if body is None else body.model_dump(exclude_none=True)
            )
        except httpx.ConnectError as e:
            raise ClientError(
                f"cannot reach P1 at {self.url}: {type(e).__name__}: {e}; is `stip-developer serve` running "
                "there? (the URL: --developer-url or STIP_DEVELOPER_URL)"
            ) from None
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach P1 at {self.url}: {type(e).__name__}: {e}") from None
        if not response.is_success:
            try:
                error = response.json()["error"]
                code, message = str(error["code"]), str(error["message"])
            except (ValueError, KeyError, TypeError):
                code, message = None, response.text[:200] or response.reason_phrase
            raise ClientError(f"P1 answered {response.status_code}: {message}", status=response.status_code, code=code)
        try:
            return TypeAdapter(out).validate_json(response.content)
        except ValidationError:
            raise ClientError(f"P1 answered {method} {path} with an unexpected body") from None

    def register(self, path: str | Path, *, name: str | None = None) -> schemas.ModelInfo:
        body = schemas.RegisterModel(path=str(path), name=name)
        return self._call("POST", api.MODELS_PATH, schemas.ModelInfo, body)

    def models(self) -> list[schemas.ModelInfo]:
        return self._call("GET", api.MODELS_PATH, list[schemas.ModelInfo])

    def deploy(
        self, model_id: str, *, cloud_url: str, mode: Literal["embeds", "token"] = "embeds"
    ) -> schemas.DeploymentStatus:
        body = schemas.CreateDeployment(model_id=model_id, cloud_url=cloud_url, mode=mode)
        return self._call("POST", api.DEPLOYMENTS_PATH, schemas.DeploymentStatus, body)

    def deployment(self, deployment_id: str) -> schemas.DeploymentStatus:
        return self._call("GET", api.path(api.DEPLOYMENT_PATH, deployment_id=deployment_id), schemas.DeploymentStatus)

    def deployments(self) -> list[schemas.DeploymentStatus]:
        return self._call("GET", api.DEPLOYMENTS_PATH, list[schemas.DeploymentStatus])

    def rotate(self, deployment_id: str) -> schemas.DeploymentStatus:
        return self._call("POST", api.path(api.ROTATE_PATH, deployment_id=deployment_id), schemas.DeploymentStatus)

    def issue_credential(
        self, deployment_id: str, *, name: str = "user", ttl_s: int | None = None
    ) -> schemas.CredentialIssued:
        body = schemas.IssueCredential(name=name, ttl_s=ttl_s)
        return self._call("POST", api.path(api.USERS_PATH, deployment_id=deployment_id), schemas.CredentialIssued, body)

    def credentials(self, deployment_id: str) -> list[schemas.CredentialInfo]:
        return self._call("GET", api.path(api.USERS_PATH, deployment_id=deployment_id), list[schemas.CredentialInfo])

    def revoke_credential(self, deployment_id: str, user_id: str) -> schemas.CredentialInfo:
        return self._call(
            "DELETE", api.path(api.USER_PATH, deployment_id=deployment_id, user_id=user_id), schemas.CredentialInfo
        )

    def delete_deployment(self, deployment_id: str) -> schemas.DeletedDeployment:
        return self._call(
            "DELETE", api.path(api.DEPLOYMENT_PATH, deployment_id=deployment_id), schemas.DeletedDeployment
        )

    def delete_model(self, model_id: str) -> schemas.DeletedModel:
        return self._call("DELETE", api.path(api.MODEL_PATH, model_id=model_id), schemas.DeletedModel)

    def wait(
        self,
        deployment_id: str,
        *,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
        on_status: Callable[[schemas.DeploymentStatus], None] | None = None,
    ) -> schemas.DeploymentStatus:
        """Poll until the deployment's job ends (status no longer pending or rotating)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.deployment(deployment_id)
            if on_status is not None:
                on_status(status)
            if status.status not in ("pending", "rotating"):
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"deployment {deployment_id} still {status.status} after {timeout_s} s")
            time.sleep(poll_s)
