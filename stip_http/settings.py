"""What the services' settings share: the server fields both have, and secrets read from files."""

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class ServiceSettings(BaseSettings):
    """The fields of a service's HTTP server that P1 and P2 share (each subclass sets its env prefix,
    its port, data directory and connection bound)."""

    host: str = "127.0.0.1"
    log_level: LogLevel = "INFO"
    # P1 sends it with every weight push; P2 refuses pushes without one
    push_token: SecretStr | None = Field(None, description="the token of weight pushes (P1 -> P2)")
    push_token_file: Path | None = None
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    keep_alive_s: int = Field(5, ge=1, description="an idle keep-alive connection is closed after this")
    header_timeout_s: float = Field(10.0, gt=0, description="a request line and headers must arrive within this")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="request line and headers")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _push_token_and_tls(self) -> "ServiceSettings":
        prefix = self.model_config.get("env_prefix", "")
        self.push_token = resolve_secret(prefix + "PUSH_TOKEN", self.push_token, self.push_token_file)
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError(f"set both {prefix}TLS_CERTFILE and {prefix}TLS_KEYFILE, or neither")
        return self


def resolve_secret(env_name: str, value: SecretStr | None, file: Path | None) -> SecretStr | None:
    """A secret from its variable or from the file `{env_name}_FILE` names (docker secrets).

    Both at once, an unreadable or empty file, or an empty value is an error naming the variable.
    """
    if file is not None:
        if value is not None:
            raise ValueError(f"set {env_name} or {env_name}_FILE, not both")
        try:
            text = file.read_text().strip()
        except OSError as e:
            raise ValueError(f"{env_name}_FILE: cannot read {file}: {e.strerror}") from None
        if not text:
            raise ValueError(f"{env_name}_FILE: {file} is empty")
        return SecretStr(text)
    if value is not None and not value.get_secret_value().strip():
        raise ValueError(f"{env_name} is empty")
    return value
