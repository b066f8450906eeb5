"""P1's configuration: pydantic-settings classes read from `STIP_DEVELOPER_*` variables.

Secrets are `SecretStr` and may come from files (`*_FILE`, for Docker secrets). Settings are
built by the factories at the bottom, never at import time.
"""

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stip_http.settings import ServiceSettings, resolve_secret

ENV_PREFIX = "STIP_DEVELOPER_"
DEFAULT_PORT = 8001
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
DAY_S = 86_400


class DeveloperSettings(ServiceSettings):
    """`stip-developer serve`: P1, the developer service."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    data_dir: Path = Field(Path("data/developer"), description="registry, deployments, keys")

    admin_token: SecretStr | None = Field(None, description="required for every /v1 admin route")
    admin_token_file: Path | None = None

    credential_ttl_s: int = Field(30 * DAY_S, gt=0, description="default user credential lifetime")
    public_cloud_url: str | None = Field(
        None, description="the P2 URL written into user bundles, when it differs from the push URL"
    )

    ca_bundle: Path | None = Field(None, description="CA file to verify P2's TLS certificate")

    push_timeout_s: float = Field(900.0, gt=0, description="read/write timeout of a weight push")
    push_attempts: int = Field(3, ge=1, description="tries per push on network errors and 5xx")
    push_retry_backoff_s: float = Field(2.0, ge=0)
    shard_bytes: int = Field(2 << 30, gt=0, description="size of the transformed cloud shards")
    max_parallel_jobs: int = Field(1, ge=1, description="transforms/pushes running at once")
    allow_token_mode: bool = Field(
        False,
        description="allow deployments in token mode (PROTOCOL.md section 7): P2 then holds the permuted "
        "token table and sees ids relabelled by π_c; see SECURITY.md for what that reveals",
    )

    max_body_bytes: int = Field(1 << 20, gt=0, description="every request body (JSON); 413 past it")
    max_connections: int = Field(256, ge=1, description="open connections and requests (uvicorn limit_concurrency)")

    @field_validator("public_cloud_url")
    @classmethod
    def _strip_slash(cls, v: str | None) -> str | None:
        return v.rstrip("/") if v else None

    @model_validator(mode="after")
    def _secrets(self) -> "DeveloperSettings":
        self.admin_token = resolve_secret(ENV_PREFIX + "ADMIN_TOKEN", self.admin_token, self.admin_token_file)
        return self


class DeveloperClientSettings(BaseSettings):
    """The `stip-developer` client subcommands: where P1 is and the admin token."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    url: str = DEFAULT_URL
    admin_token: SecretStr | None = None
    admin_token_file: Path | None = None
    ca_bundle: Path | None = None
    timeout_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _secrets(self) -> "DeveloperClientSettings":
        self.admin_token = resolve_secret(ENV_PREFIX + "ADMIN_TOKEN", self.admin_token, self.admin_token_file)
        self.url = self.url.rstrip("/")
        return self


def load_settings(**overrides: Any) -> DeveloperSettings:
    """Settings from the environment; explicit keyword arguments (CLI flags) win."""
    return DeveloperSettings(**{k: v for k, v in overrides.items() if v is not None})


def load_client_settings(**overrides: Any) -> DeveloperClientSettings:
    """Client settings; a token given on the command line replaces both environment variants."""
    values = {k: v for k, v in overrides.items() if v is not None}
    if "admin_token" in values:
        values["admin_token_file"] = None
    elif "admin_token_file" in values:
        values["admin_token"] = None
    return DeveloperClientSettings(**values)
