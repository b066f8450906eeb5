"""P2's configuration: one pydantic-settings class read from `STIP_CLOUD_*` variables.

The push token is a `SecretStr` and may come from a file (`STIP_CLOUD_PUSH_TOKEN_FILE`, for
Docker secrets). Settings are built by `load_settings`, never at import time; command-line
flags given to `stip-cloud serve` win over the environment.
"""

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings_util import resolve_secret

ENV_PREFIX = "STIP_CLOUD_"
DEFAULT_PORT = 8002
MIB = 1 << 20
GIB = 1 << 30

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
DType = Literal["float32", "bfloat16", "float16"]


class CloudSettings(BaseSettings):
    """`stip-cloud serve`: P2, the cloud service."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    data_dir: Path = Field(Path("data/cloud"), description="pushed weights and their active.json")
    log_level: LogLevel = "INFO"

    push_token: SecretStr | None = Field(None, description="P1's push token; pushes are refused without one")
    push_token_file: Path | None = None

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto: cuda when available")
    dtype: DType = "float32"

    max_sessions: int = Field(256, ge=1, description="live sessions at once")
    session_idle_ttl_s: int = Field(600, gt=0, description="a session unused this long expires")
    session_memory_bytes: int = Field(4 * GIB, gt=0, description="bound on the KV caches of all sessions")
    max_body_bytes: int = Field(128 * MIB, gt=0, description="forward request bodies; 413 past it")
    max_push_bytes: int = Field(256 * GIB, gt=0, description="weight push bodies; 413 past it")
    max_batch: int = Field(64, ge=1, description="rows of one forward request")
    max_prompt_tokens: int = Field(8192, ge=1, description="token mode: ids of one generate request")
    max_new_tokens: int = Field(2048, ge=1, description="token mode: the largest max_tokens of a generate request")
    forward_threads: int = Field(
        2, ge=1, description="worker threads per deployment that parse large forward bodies; more wait their turn"
    )
    batch_max_rows: int = Field(
        32, ge=1, description="rows of one batched forward (requests of one deployment together)"
    )
    batch_max_tokens: int = Field(8192, ge=1, description="rows x padded positions of one batched forward")
    batch_wait_ms: float = Field(
        20.0,
        ge=0,
        description="how long a batch may wait for more requests: only while it has fewer than the last two "
        "batches' requesters, and never more than half the previous batch's run time",
    )
    max_json_bytes: int = Field(MIB, gt=0, description="every body other than forward and push (JSON); 413 past it")
    max_response_bytes: int = Field(
        256 * MIB, gt=0, description="outputs of one forward, computed from the request before it runs; 422 past it"
    )
    forward_bodies: int = Field(
        4,
        ge=1,
        description="forward bodies of the largest size per deployment held at once: a body budget of this x "
        "max_body_bytes, each body taking its Content-Length of it (chunked: max_body_bytes); more wait",
    )

    max_sessions_per_user: int = Field(16, ge=1, description="live sessions of one credential subject")
    session_memory_bytes_per_user: int = Field(512 * MIB, gt=0, description="KV cache bytes of one user's sessions")
    max_forwards_per_user: int = Field(8, ge=1, description="forward requests of one user in flight; 429 past it")

    max_connections: int = Field(512, ge=1, description="open connections and requests (uvicorn limit_concurrency)")
    keep_alive_s: int = Field(5, ge=1, description="an idle keep-alive connection is closed after this")
    header_timeout_s: float = Field(10.0, gt=0, description="a request line and headers must arrive within this")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="request line and headers")

    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _secrets_and_tls(self) -> "CloudSettings":
        self.push_token = resolve_secret(ENV_PREFIX + "PUSH_TOKEN", self.push_token, self.push_token_file)
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError(f"set both {ENV_PREFIX}TLS_CERTFILE and {ENV_PREFIX}TLS_KEYFILE, or neither")
        return self


def load_settings(**overrides: Any) -> CloudSettings:
    """Settings from the environment; explicit keyword arguments (CLI flags) win."""
    return CloudSettings(**{k: v for k, v in overrides.items() if v is not None})
