"""The HTTP contract between P1, P2 and P3: paths, headers, metadata keys, JSON schemas.

Both services and the SDK import these names, so a route, a header or a field is spelled
in one place. Bodies that carry tensors are safetensors (shared.wire); everything else is
JSON with the models below. Every error is `{"error": {"code", "message"}}`.
"""

from typing import Literal
from urllib.parse import quote

from pydantic import BaseModel, Field

# --- paths (PROTOCOL.md section 4): templates for the routes, `path(...)` for the clients ------
HEALTH_LIVE_PATH = "/health/live"  # both services, open
HEALTH_READY_PATH = "/health/ready"
METRICS_PATH = "/metrics"
# P1, developer service
MODELS_PATH = "/v1/models"
MODEL_PATH = MODELS_PATH + "/{model_id}"
DEPLOYMENTS_PATH = "/v1/deployments"
DEPLOYMENT_PATH = DEPLOYMENTS_PATH + "/{deployment_id}"  # P1's deployment status; P2's public facts
ROTATE_PATH = DEPLOYMENT_PATH + "/rotate"
USERS_PATH = DEPLOYMENT_PATH + "/users"
USER_PATH = USERS_PATH + "/{user_id}"
USER_KEY_PATH = DEPLOYMENT_PATH + "/user-key"
# P2, cloud service
PUSH_PATH = DEPLOYMENT_PATH + "/weights"
REVOCATIONS_PATH = DEPLOYMENT_PATH + "/revocations"
SESSIONS_PATH = DEPLOYMENT_PATH + "/sessions"
SESSION_PATH = "/v1/sessions/{session_id}"
FORWARD_PATH = DEPLOYMENT_PATH + "/forward"
GENERATE_PATH = DEPLOYMENT_PATH + "/generate"  # token mode (PROTOCOL.md section 7)


def path(template: str, **ids: str) -> str:
    """A concrete path: each `{name}` of `template` filled with its id, URL-quoted.

    `path(FORWARD_PATH, deployment_id="d-1")` is "/v1/deployments/d-1/forward"."""
    return template.format(**{name: quote(value, safe="") for name, value in ids.items()})


# --- headers -----------------------------------------------------------------------------
KEY_VERSION_HEADER = "X-Stip-Key-Version"  # the key version a client's tensors are permuted with
DIGEST_HEADER = "X-Stip-Sha256"  # hex SHA-256 of a weight push body
FINGERPRINT_HEADER = "X-Stip-Fingerprint"  # SHA-256 fingerprint of the user key in a bundle

# --- safetensors __metadata__ keys of a weight push (P1 -> P2) ----------------------------
PUSH_DEPLOYMENT = "stip.deployment_id"
PUSH_FAMILY = "stip.family"
PUSH_CONFIG = "stip.config"  # the cloud config.json, as JSON text
PUSH_KEY_VERSION = "stip.key_version"
PUSH_VERIFY_KEY = "stip.verify_key"  # P1's Ed25519 public key, base64url: verifies user credentials
PUSH_MODE = "stip.mode"  # "token": θ′ carries the permuted token table E′ (PROTOCOL.md section 7); absent: embeds


def push_metadata(
    *, deployment_id: str, family: str, config_json: str, key_version: int, verify_key: str, mode: "Mode"
) -> dict[str, str]:
    """The safetensors __metadata__ of a weight push (P1 -> P2), which P2 checks key by key."""
    metadata = {
        PUSH_DEPLOYMENT: deployment_id,
        PUSH_FAMILY: family,
        PUSH_CONFIG: config_json,
        PUSH_KEY_VERSION: str(key_version),
        PUSH_VERIFY_KEY: verify_key,
    }
    if mode == "token":
        metadata[PUSH_MODE] = "token"  # P2 accepts the embedding tables of this push only then
    return metadata


# Deployment modes (PROTOCOL.md section 7): every deployment serves embeds mode; a token-mode one
# also serves POST /v1/deployments/{id}/generate on ids relabelled by π_c.
Mode = Literal["embeds", "token"]

# --- tensor names of forward (P3 <-> P2) ------------------------------------------------------
INPUTS_EMBEDS = "inputs_embeds"  # (B, S, d) permuted by π
ATTENTION_MASK = "attention_mask"  # (B, S) 1 = token, 0 = padding
LOGITS = "logits"  # (B, S', V) permuted by π_c
TOPK_VALUES = "topk_values"  # (B, S', k)
TOPK_INDICES = "topk_indices"  # (B, S', k) int64, indices in the permuted space: token = pi_c[index]
HIDDEN_STATES = "hidden_states"  # (B, S, d) permuted by π (encoders)
POOLED = "pooled"  # (B, d) permuted by π (encoders with a pooler)
# response metadata keys
META_DEPLOYMENT = "deployment_id"
META_KEY_VERSION = "key_version"
META_SESSION_LENGTH = "session_length"
META_DTYPE = "dtype"  # P2's compute dtype ("float32", "float16", "bfloat16"): x·π may travel in it

OutputMode = Literal["last", "all", "topk"]

# --- error codes (stable; the SDK maps them to exceptions) -------------------------------
E_UNAUTHORIZED = "unauthorized"  # 401: missing or invalid credential
E_FORBIDDEN = "forbidden"  # 403: valid credential, wrong scope or deployment
E_NOT_FOUND = "not_found"  # 404
E_KEY_OUTDATED = "key_outdated"  # 409: tensors permuted with a key version P2 no longer serves
E_CONFLICT = "conflict"  # 409
E_SESSION_EXPIRED = "session_expired"  # 410
E_TOO_LARGE = "payload_too_large"  # 413
E_BAD_INPUT = "bad_input"  # 400 / 422 (stip_http.errors.ERRORS: the status of each error)
E_TOO_MANY_SESSIONS = "too_many_sessions"  # 429
E_TOO_MANY_REQUESTS = "too_many_requests"  # 429: a per-user quota of requests in flight
E_METHOD_NOT_ALLOWED = "method_not_allowed"  # 405
E_NOT_READY = "not_ready"  # 503
E_INTERNAL = "internal"  # 500


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


# --- P2, cloud service ------------------------------------------------------------------


class DeploymentInfo(BaseModel):
    """Public facts about a deployment on P2: no secret, no permutation."""

    deployment_id: str
    family: str
    d_model: int
    d_out: int
    n_layers: int
    key_version: int
    status: Literal["active"]
    device: str
    dtype: str
    max_positions: int | None = None
    mode: Mode = "embeds"


class PushResult(BaseModel):
    deployment_id: str
    key_version: int
    status: Literal["active"]
    sha256: str


class LoadProgress(BaseModel):
    """P2's `GET /v1/deployments/{id}/weights` (P1's push token): the push P2 is installing.

    After the last byte of a push P2 verifies the body (`verifying`), builds the stock class on
    θ′ (`loading`: bytes of tensors read of all of them), runs its test forward (`testing`) and
    switches to the new version (`activating`); then the push answers and this reads 404 again.
    """

    deployment_id: str
    key_version: int
    stage: Literal["verifying", "loading", "testing", "activating"]
    done: int = 0  # bytes of θ′'s tensors loaded
    total: int = 0  # bytes of all of θ′'s tensors (0 until the body is verified)


MAX_REVOCATIONS = 100_000  # entries in one revocation list (about 5 MB of JSON)


class Revoked(BaseModel):
    jti: str = Field(min_length=1, max_length=64, description="the credential's unique id")
    expires_at: int = Field(description="the credential's expiry (Unix seconds): P2 forgets it after that")


class Revocations(BaseModel):
    """P1 -> P2: the full list of a deployment's revoked, unexpired credentials (it replaces the last)."""

    revoked: list[Revoked] = Field(max_length=MAX_REVOCATIONS)


class RevocationsResult(BaseModel):
    deployment_id: str
    revoked: int = Field(description="entries P2 now holds (expired ones dropped)")


class DeploymentDeleted(BaseModel):
    """P2's answer to `DELETE /v1/deployments/{id}` (P1's push token): θ′, its files and its sessions are gone."""

    deployment_id: str
    sessions_ended: int = Field(description="live sessions of the deployment that ended (404 afterwards)")


class SessionCreated(BaseModel):
    session_id: str
    deployment_id: str
    key_version: int
    idle_ttl_s: int
    # forward steps of this session may send `Authorization: Bearer <session_token>` instead of the
    # credential (22 characters against about 240); a P2 that predates it sends none
    session_token: str | None = None


class GenerateRequest(BaseModel):
    """P3 -> P2, token mode: generate from ids relabelled by π_c (a real token t is argsort(π_c)[t]).

    temperature 0 is greedy; otherwise transformers' processors repetition penalty, temperature,
    top-k, top-p apply on P2, and `seed` makes the draw reproducible. Generation stops after
    `max_tokens`, or once it has produced one of `stop_ids` (included in the answer).
    """

    model_config = {"extra": "forbid"}

    input_ids: list[int] = Field(min_length=1, description="the prompt, relabelled by π_c")
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop_ids: list[int] = Field(default_factory=list, max_length=64, description="relabelled ids that end it")
    stream: bool = False


FinishReason = Literal["stop", "length"]


class GenerateResult(BaseModel):
    """P2 -> P3, token mode (JSON, or the last server-sent event `done` without `ids`)."""

    deployment_id: str
    key_version: int
    ids: list[int] = Field(description="the generated ids, relabelled: the real token is pi_c[id]")
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int


# --- P1, developer service --------------------------------------------------------------


class RegisterModel(BaseModel):
    path: str = Field(description="local Hugging Face model directory on P1's machine")
    name: str | None = None


class ModelInfo(BaseModel):
    model_id: str
    name: str
    path: str
    family: str
    architectures: list[str]
    d_model: int
    d_out: int
    n_layers: int


class CreateDeployment(BaseModel):
    model_id: str
    cloud_url: str
    mode: Mode = Field(
        "embeds",
        description="token: P2 also receives the permuted token table and generates on relabelled ids "
        "(decoders only; P1 needs STIP_DEVELOPER_ALLOW_TOKEN_MODE=true)",
    )


class Progress(BaseModel):
    # loading: P2 builds the model on θ′ and runs its test forward (done/total: tensor bytes, as P2 reports)
    stage: Literal["queued", "transforming", "pushing", "loading", "done", "failed"]
    done: int = 0
    total: int = 0


class DeploymentStatus(BaseModel):
    deployment_id: str
    model_id: str
    family: str
    cloud_url: str
    status: Literal["pending", "active", "rotating", "failed", "deleting"]
    key_version: int | None = Field(None, description="the version users get (active on P2)")
    pending_key_version: int | None = None
    progress: Progress
    error: str | None = None
    mode: Mode = "embeds"


class DeletedDeployment(BaseModel):
    """P1's answer to `DELETE /v1/deployments/{id}`."""

    deployment_id: str
    status: Literal["deleted", "deleting"] = Field(
        description="deleted: gone on P1 and P2; deleting: gone on P1, P2 not reached yet (P1 keeps asking)"
    )
    credentials_revoked: int
    cloud_deleted: bool = Field(description="P2 has removed θ′ and ended the deployment's sessions")


class DeletedModel(BaseModel):
    """P1's answer to `DELETE /v1/models/{id}`: the registry entry is gone (the directory is untouched)."""

    model_id: str
    path: str


class IssueCredential(BaseModel):
    name: str = "user"
    ttl_s: int | None = Field(None, gt=0, description="lifetime; the service default when omitted")


class CredentialIssued(BaseModel):
    user_id: str
    deployment_id: str
    credential: str
    expires_at: int


# --- the user bundle (GET /v1/deployments/{id}/user-key: a tar of the user/ directory) ---


class BundleManifest(BaseModel):
    """`stip.json` inside the user bundle."""

    format: str
    family: str
    key_version: int
    fingerprint: str
    deployment_id: str | None = None
    cloud_url: str | None = None
    mode: Mode = "embeds"
