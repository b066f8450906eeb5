"""Client defaults from the environment (prefix `STIP_CLIENT_`).

Explicit constructor arguments and command-line options win over these. Built on demand by
`ClientSettings()`, never at import time.

    STIP_CLIENT_DEVELOPER_URL   P1's base URL
    STIP_CLIENT_CLOUD_URL       P2's base URL (default: the `cloud_url` of the bundle)
    STIP_CLIENT_DEPLOYMENT_ID   the deployment (STIP_CLIENT_DEPLOYMENT is accepted too)
    STIP_CLIENT_CREDENTIAL      the user credential issued by P1
    STIP_CLIENT_CACHE_DIR       bundle cache (default: $XDG_CACHE_HOME/stip or ~/.cache/stip)
    STIP_CLIENT_TIMEOUT         seconds per HTTP request (default 120)
    STIP_CLIENT_VERIFY          true / false / path to a CA bundle (default true)
    STIP_CLIENT_RETRIES         retries of idempotent calls (default 5)
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stip"


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STIP_CLIENT_", extra="ignore", populate_by_name=True)

    developer_url: str | None = None
    cloud_url: str | None = None
    deployment_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("deployment_id", "STIP_CLIENT_DEPLOYMENT_ID", "STIP_CLIENT_DEPLOYMENT"),
    )
    credential: SecretStr | None = None
    cache_dir: Path | None = None
    timeout: float = Field(default=120.0, gt=0)
    verify: bool | str = True
    retries: int = Field(default=5, ge=0)

    @field_validator("verify", mode="before")
    @classmethod
    def _parse_verify(cls, value: object) -> object:
        if isinstance(value, str):
            low = value.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
        return value

    def resolved_cache_dir(self) -> Path:
        return (self.cache_dir or default_cache_dir()).expanduser()
