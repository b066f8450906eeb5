"""Gateway settings: `STIP_GATEWAY_*` for the gateway itself, `STIP_CLIENT_*` for the SDK.

    STIP_GATEWAY_HOST / _PORT        bind address (default 127.0.0.1:8400)
    STIP_GATEWAY_API_KEY[_FILE]      the gateway's own bearer key (default: none, open on loopback;
                                     required to bind anything but a loopback address)
    STIP_GATEWAY_CONFIG              a TOML file of models (below)
    STIP_GATEWAY_DEPLOYMENTS         NAME=DEPLOYMENT_ID[:CREDENTIAL_ENV], comma-separated
    STIP_GATEWAY_LOG_LEVEL           INFO

The models file names each model and the deployment behind it:

    [models.llama]
    deployment_id = "dep-3df1198cf446"
    credential_env = "LLAMA_CREDENTIAL"   # or credential_file = "..."; default STIP_CLIENT_CREDENTIAL
    # developer_url, cloud_url: default STIP_CLIENT_DEVELOPER_URL / the bundle's cloud URL
    # chat_template_file = "chat.jinja"  # used when the tokenizer has no chat template

With neither a file nor `--deployment`, the gateway serves STIP_CLIENT_DEPLOYMENT_ID under its
own id as the model name.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from user_client.settings import ClientSettings

MODEL_KEYS = {"deployment_id", "credential_env", "credential_file", "developer_url", "cloud_url", "chat_template_file"}


class ConfigError(ValueError):
    """The gateway's configuration is incomplete or inconsistent; the message names the fix."""


@dataclass(frozen=True)
class ModelSpec:
    """One model the gateway exposes: an OpenAI model name for a STIP deployment."""

    name: str
    deployment_id: str
    credential: SecretStr
    developer_url: str | None = None
    cloud_url: str | None = None
    chat_template: str | None = None


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STIP_GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8400
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    config: Path | None = None
    deployments: str = ""  # NAME=DEPLOYMENT_ID[:CREDENTIAL_ENV], comma-separated
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _one_key_source(self) -> GatewaySettings:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set STIP_GATEWAY_API_KEY or STIP_GATEWAY_API_KEY_FILE, not both")
        return self

    def resolved_api_key(self) -> str | None:
        if self.api_key_file is not None:
            key = self.api_key_file.read_text().strip()
        else:
            key = self.api_key.get_secret_value() if self.api_key is not None else ""
        return key or None

    def check_exposure(self) -> None:
        """Refuse to offer the user's credentials beyond this machine without a gateway key."""
        if self.resolved_api_key() is None and not _is_loopback(self.host):
            raise ConfigError(
                f"binding {self.host} without a gateway API key lets anyone who can reach it use your "
                "credentials: set STIP_GATEWAY_API_KEY (or _FILE), or bind 127.0.0.1"
            )

    def models(self, client: ClientSettings | None = None) -> list[ModelSpec]:
        """The models to serve, from the TOML file and `deployments`, in that order."""
        env = client or ClientSettings()
        specs: list[ModelSpec] = []
        if self.config is not None:
            specs += _from_file(self.config, env)
        specs += [_from_flag(item, env) for item in self.deployments.split(",") if item.strip()]
        if not specs and env.deployment_id:
            specs.append(_spec(env.deployment_id, {"deployment_id": env.deployment_id}, env, Path.cwd()))
        if not specs:
            raise ConfigError(
                "no models: pass --deployment NAME=DEPLOYMENT_ID, a --config file, or set STIP_CLIENT_DEPLOYMENT_ID"
            )
        names = [s.name for s in specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"model names given twice: {', '.join(dup)}")
        return specs


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _from_flag(item: str, env: ClientSettings) -> ModelSpec:
    name, sep, rest = item.strip().partition("=")
    deployment_id, _, credential_env = rest.partition(":")
    if not sep or not name or not deployment_id:
        raise ConfigError(f"--deployment {item!r}: expected NAME=DEPLOYMENT_ID[:CREDENTIAL_ENV]")
    entry = {"deployment_id": deployment_id}
    if credential_env:
        entry["credential_env"] = credential_env
    return _spec(name, entry, env, Path.cwd())


def _from_file(path: Path, env: ClientSettings) -> list[ModelSpec]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"gateway config {path}: {e}") from None
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"gateway config {path}: no [models.NAME] tables")
    specs = []
    for name, entry in models.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"gateway config {path}: models.{name} must be a table")
        unknown = sorted(set(entry) - MODEL_KEYS)
        if unknown:
            raise ConfigError(f"gateway config {path}: models.{name} has unknown keys {unknown}")
        specs.append(_spec(name, entry, env, path.parent))
    return specs


def _spec(name: str, entry: Mapping[str, object], env: ClientSettings, base: Path) -> ModelSpec:
    where = f"model {name!r}"
    deployment_id = entry.get("deployment_id")
    if not isinstance(deployment_id, str) or not deployment_id:
        raise ConfigError(f"{where}: deployment_id is required")
    credential = _credential(where, entry, env, base)
    template = None
    if entry.get("chat_template_file"):
        template_path = base / str(entry["chat_template_file"])
        try:
            template = template_path.read_text()
        except OSError as e:
            raise ConfigError(f"{where}: chat_template_file: {e}") from None
    developer_url = str(entry.get("developer_url") or env.developer_url or "")
    if not developer_url:
        raise ConfigError(f"{where}: no P1 URL: set STIP_CLIENT_DEVELOPER_URL or developer_url")
    return ModelSpec(
        name=name,
        deployment_id=deployment_id,
        credential=credential,
        developer_url=developer_url,
        cloud_url=str(entry["cloud_url"]) if entry.get("cloud_url") else None,
        chat_template=template,
    )


def _credential(where: str, entry: Mapping[str, object], env: ClientSettings, base: Path) -> SecretStr:
    if entry.get("credential_env") and entry.get("credential_file"):
        raise ConfigError(f"{where}: give credential_env or credential_file, not both")
    if entry.get("credential_file"):
        try:
            value = (base / str(entry["credential_file"])).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{where}: credential_file: {e}") from None
    elif entry.get("credential_env"):
        variable = str(entry["credential_env"])
        value = os.environ.get(variable, "").strip()
        if not value:
            raise ConfigError(f"{where}: the environment variable {variable} holding its credential is not set")
    else:
        value = env.credential.get_secret_value() if env.credential is not None else ""
        if not value:
            raise ConfigError(f"{where}: no credential: set STIP_CLIENT_CREDENTIAL, or credential_env / _file")
    return SecretStr(value)
