"""P2's request and response models, and the small records it keeps on disk.

The wire schemas shared with P1 and P3 live in `shared.api` and are re-exported here; the
rest is P2's own: `active.json` of a deployment, the parsed forward options, health bodies.
"""

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.api import DeploymentInfo, ErrorResponse, LoadProgress, Mode, OutputMode, PushResult, SessionCreated


class ActiveRecord(BaseModel):
    """`DATA/deployments/{id}/active.json`: which version file serves, written atomically."""

    deployment_id: str
    key_version: int = Field(ge=1)
    file: str  # the version file's name inside the deployment's directory
    sha256: str
    size: int = Field(ge=0)
    activated_at: int


class Health(BaseModel):
    status: Literal["live", "ready"]
    deployments: int | None = None


@dataclass(frozen=True)
class PushManifest:
    """What the `__metadata__` of a weight push says, checked (see service.inspect_push)."""

    deployment_id: str
    family: str
    config: dict[str, Any]
    key_version: int
    verify_key: str
    mode: Mode = "embeds"  # "token": θ′ carries the permuted token table (PROTOCOL.md section 7)


@dataclass(frozen=True)
class ForwardOptions:
    """The query options of `forward`, as the client sent them (validated by the service)."""

    output: OutputMode = "all"
    k: int | None = None
    session_id: str | None = None


@dataclass(frozen=True)
class ForwardResult:
    body: bytes  # safetensors
    key_version: int
    session_length: int
    tokens: int  # real (unmasked) tokens processed


__all__ = [
    "ActiveRecord",
    "DeploymentInfo",
    "ErrorResponse",
    "ForwardOptions",
    "ForwardResult",
    "Health",
    "LoadProgress",
    "PushManifest",
    "PushResult",
    "SessionCreated",
]
