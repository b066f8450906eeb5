"""Request and response models of P1.

The contract models live in `shared.api` (the SDK and P2 import them too) and are
re-exported here; P1-only models (credential listings, health) are defined below.
"""

from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, Field

from shared.api import (
    BundleManifest,
    CreateDeployment,
    CredentialIssued,
    DeletedDeployment,
    DeletedModel,
    DeploymentStatus,
    ErrorBody,
    ErrorResponse,
    IssueCredential,
    ModelInfo,
    Progress,
    RegisterModel,
)

if TYPE_CHECKING:
    from developer_service.store import CredentialRecord

M = TypeVar("M", bound=BaseModel)


def from_fields(model: type[M], record: BaseModel, **values: Any) -> M:
    """A `model` from the fields of `record` (a store record) that it declares, `values` winning:
    only what the answer names leaves P1 (never a credential's token hash)."""
    return model(**{**record.model_dump(include=set(model.model_fields)), **values})


class CredentialInfo(BaseModel):
    """An issued credential as P1 lists it: claims only, never the token."""

    user_id: str
    name: str
    deployment_id: str
    issued_at: int
    expires_at: int
    revoked: bool
    revoked_at: int | None = None
    cloud_synced: bool | None = Field(
        default=None,
        description="in a revocation's answer: whether P2 already refuses the credential; when false, "
        "P1 keeps sending the list to P2 in the background until it does",
    )

    @classmethod
    def from_record(cls, record: "CredentialRecord") -> "CredentialInfo":
        return from_fields(cls, record, revoked=record.revoked_at is not None)


class Health(BaseModel):
    status: Literal["ok", "ready", "not_ready"]


__all__ = [
    "BundleManifest",
    "CreateDeployment",
    "CredentialInfo",
    "CredentialIssued",
    "DeletedDeployment",
    "DeletedModel",
    "DeploymentStatus",
    "ErrorBody",
    "ErrorResponse",
    "Health",
    "IssueCredential",
    "ModelInfo",
    "Progress",
    "RegisterModel",
]
