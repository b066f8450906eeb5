"""P1's persistent state: the model registry, deployments and issued credentials.

One JSON document, `DATA/state.json` (mode 0600), rewritten atomically (temporary file,
fsync, `os.replace`) on every change, so a crash leaves either the old or the new state.
Credentials are stored as the SHA-256 of the token plus their claims, never the token.
Key material does not live here: it sits in `DATA/deployments/{id}/v{n}/`, written by
`shared.checkpoint.transform_model_dir` with owner-only permissions.
"""

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from developer_service.errors import StateError, UnknownCredential, UnknownDeployment, UnknownModel
from shared.api import Mode, ModelInfo, Progress
from shared.files import write_atomic

STATE_FORMAT = 1

DeploymentState = Literal["pending", "active", "rotating", "failed", "deleting"]


class ModelRecord(ModelInfo):
    registered_at: int


class DeploymentRecord(BaseModel):
    deployment_id: str
    model_id: str
    family: str
    cloud_url: str
    status: DeploymentState
    key_version: int | None = None  # active on P2: what users get
    pending_key_version: int | None = None  # being transformed / pushed
    last_version: int = 0  # highest version ever drawn: versions are never reused
    fingerprint: str | None = None  # of the active user key (a hash, not a secret)
    progress: Progress = Progress(stage="queued")  # the last stage reached; live counts are in memory
    error: str | None = None
    created_at: int
    updated_at: int
    mode: Mode = "embeds"  # token: θ′ carries E′, P2 generates on relabelled ids (kept across rotations)


class CredentialRecord(BaseModel):
    user_id: str
    name: str
    deployment_id: str
    jti: str
    token_sha256: str
    issued_at: int
    expires_at: int
    revoked_at: int | None = None


class State(BaseModel):
    format: int = STATE_FORMAT
    models: dict[str, ModelRecord] = {}
    deployments: dict[str, DeploymentRecord] = {}
    credentials: dict[str, CredentialRecord] = {}


R = TypeVar("R", bound=BaseModel)  # a record of the state document


class Store:
    """Thread-safe access to the state document. Getters return copies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._state = self._load()
        self._by_hash = {c.token_sha256: c.user_id for c in self._state.credentials.values()}

    def _load(self) -> State:
        if not self.path.exists():
            return State()
        try:
            state = State.model_validate_json(self.path.read_bytes())
        except (OSError, ValidationError) as e:
            detail = e.strerror if isinstance(e, OSError) else f"{e.error_count()} invalid fields"
            raise StateError(f"cannot load P1's state from {self.path}: {detail}") from None
        if state.format != STATE_FORMAT:
            raise StateError(f"{self.path}: unknown state format {state.format}")
        return state

    def _save(self) -> None:
        data = json.dumps(self._state.model_dump(mode="json"), indent=1).encode()
        write_atomic(self.path, data)

    def _put(self, table: dict[str, R], key: str, record: R) -> None:
        with self._lock:
            table[key] = record
            self._save()

    def _get(self, table: dict[str, R], key: str, missing: Callable[[], Exception]) -> R:
        """A copy of `table[key]` (callers cannot change the state behind the lock's back)."""
        with self._lock:
            record = table.get(key)
            if record is None:
                raise missing()
            return record.model_copy()

    def _list(self, table: dict[str, R]) -> list[R]:
        with self._lock:
            return [r.model_copy() for r in table.values()]

    # --- models ------------------------------------------------------------------------

    def add_model(self, record: ModelRecord) -> None:
        self._put(self._state.models, record.model_id, record)

    def get_model(self, model_id: str) -> ModelRecord:
        return self._get(self._state.models, model_id, lambda: UnknownModel(f"no model {model_id!r} is registered"))

    def list_models(self) -> list[ModelRecord]:
        return self._list(self._state.models)

    def remove_model(self, model_id: str) -> ModelRecord:
        with self._lock:
            record = self.get_model(model_id)
            del self._state.models[model_id]
            self._save()
            return record

    # --- deployments ---------------------------------------------------------------------

    def add_deployment(self, record: DeploymentRecord) -> None:
        self._put(self._state.deployments, record.deployment_id, record)

    def get_deployment(self, deployment_id: str) -> DeploymentRecord:
        return self._get(
            self._state.deployments, deployment_id, lambda: UnknownDeployment(f"no deployment {deployment_id!r}")
        )

    def list_deployments(self) -> list[DeploymentRecord]:
        return self._list(self._state.deployments)

    def update_deployment(self, deployment_id: str, **changes: Any) -> DeploymentRecord:
        with self._lock:
            current = self.get_deployment(deployment_id)
            fields = {**current.model_dump(), **changes, "updated_at": int(time.time())}
            updated = DeploymentRecord.model_validate(fields)
            self._state.deployments[deployment_id] = updated
            self._save()
            return updated.model_copy()

    def remove_deployment(self, deployment_id: str) -> int:
        """Forget a deployment and its credentials in one write; returns how many credentials went."""
        with self._lock:
            self.get_deployment(deployment_id)
            del self._state.deployments[deployment_id]
            gone = [u for u, c in self._state.credentials.items() if c.deployment_id == deployment_id]
            for user_id in gone:
                record = self._state.credentials.pop(user_id)
                self._by_hash.pop(record.token_sha256, None)
            self._save()
            return len(gone)

    # --- credentials ---------------------------------------------------------------------

    def add_credential(self, record: CredentialRecord) -> None:
        with self._lock:
            self._state.credentials[record.user_id] = record
            self._by_hash[record.token_sha256] = record.user_id
            self._save()

    def credential_by_hash(self, token_sha256: str) -> CredentialRecord | None:
        with self._lock:
            user_id = self._by_hash.get(token_sha256)
            return None if user_id is None else self._state.credentials[user_id].model_copy()

    def list_credentials(self, deployment_id: str) -> list[CredentialRecord]:
        with self._lock:
            return [c.model_copy() for c in self._state.credentials.values() if c.deployment_id == deployment_id]

    def revoke_credential(self, deployment_id: str, user_id: str) -> CredentialRecord:
        with self._lock:
            record = self._state.credentials.get(user_id)
            if record is None or record.deployment_id != deployment_id:
                raise UnknownCredential(f"deployment {deployment_id!r} has no user {user_id!r}")
            if record.revoked_at is None:
                record.revoked_at = int(time.time())
                self._save()
            return record.model_copy()
