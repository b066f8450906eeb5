"""The gateway's configuration (models file, --deployment, exposure) and its error mapping,
without any service."""

from pathlib import Path

import pytest

from user_client import errors
from user_client.gateway.service import from_stip
from user_client.gateway.settings import ConfigError, GatewaySettings
from user_client.settings import ClientSettings

ENV = ClientSettings(developer_url="http://p1.example", credential="stip1.default")  # type: ignore[arg-type]


def test_deployment_flags_name_models_and_their_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTHER_CREDENTIAL", "stip1.other")
    specs = GatewaySettings(deployments="llama=dep-1, minilm=dep-2:OTHER_CREDENTIAL").models(ENV)
    assert [(s.name, s.deployment_id) for s in specs] == [("llama", "dep-1"), ("minilm", "dep-2")]
    assert [s.credential.get_secret_value() for s in specs] == ["stip1.default", "stip1.other"]
    assert all(s.developer_url == "http://p1.example" for s in specs)


def test_the_models_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "chat.jinja").write_text("{{ messages[0]['content'] }}")
    (tmp_path / "cred").write_text("stip1.fromfile\n")
    (tmp_path / "gw.toml").write_text(
        """
[models.chat]
deployment_id = "dep-1"
credential_file = "cred"
chat_template_file = "chat.jinja"
cloud_url = "http://p2.example"

[models.plain]
deployment_id = "dep-2"
developer_url = "http://other-p1.example"
"""
    )
    specs = GatewaySettings(config=tmp_path / "gw.toml").models(ENV)
    chat, plain = specs
    assert chat.credential.get_secret_value() == "stip1.fromfile" and chat.cloud_url == "http://p2.example"
    assert chat.chat_template == "{{ messages[0]['content'] }}" and plain.chat_template is None
    assert plain.developer_url == "http://other-p1.example" and plain.credential.get_secret_value() == "stip1.default"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[models.a]\ncredential_env = "X"', "deployment_id is required"),
        ('[models.a]\ndeployment_id = "d"\ncredential_env = "UNSET_VARIABLE_FOR_TEST"', "UNSET_VARIABLE_FOR_TEST"),
        ('[models.a]\ndeployment_id = "d"\nbogus = 1', "unknown keys"),
        ('[models.a]\ndeployment_id = "d"\nchat_template_file = "missing.jinja"', "chat_template_file"),
        ("[other]\n", "no \\[models.NAME\\] tables"),
    ],
)
def test_config_errors_name_the_fix(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "gw.toml").write_text(toml)
    with pytest.raises(ConfigError, match=message):
        GatewaySettings(config=tmp_path / "gw.toml").models(ENV)


def test_flag_errors_and_defaults() -> None:
    with pytest.raises(ConfigError, match="NAME=DEPLOYMENT_ID"):
        GatewaySettings(deployments="no-equals-sign").models(ENV)
    with pytest.raises(ConfigError, match="given twice"):
        GatewaySettings(deployments="a=d1,a=d2").models(ENV)
    with pytest.raises(ConfigError, match="no models"):
        GatewaySettings().models(ENV)
    lone = ClientSettings(developer_url="http://p1", credential="c", deployment_id="dep-9")  # type: ignore[arg-type]
    assert [s.name for s in GatewaySettings().models(lone)] == ["dep-9"]  # served under its own id
    with pytest.raises(ConfigError, match="STIP_CLIENT_DEVELOPER_URL"):
        GatewaySettings(deployments="a=d").models(ClientSettings(credential="c"))  # type: ignore[arg-type]


def test_the_api_key_is_off_on_loopback_and_required_elsewhere(tmp_path: Path) -> None:
    assert GatewaySettings().resolved_api_key() is None
    GatewaySettings().check_exposure()
    GatewaySettings(host="::1").check_exposure()
    with pytest.raises(ConfigError, match="STIP_GATEWAY_API_KEY"):
        GatewaySettings(host="0.0.0.0").check_exposure()
    (tmp_path / "key").write_text("sekrit\n")
    keyed = GatewaySettings(host="0.0.0.0", api_key_file=tmp_path / "key")
    keyed.check_exposure()
    assert keyed.resolved_api_key() == "sekrit"
    with pytest.raises(ValueError, match="not both"):
        GatewaySettings(api_key="a", api_key_file=tmp_path / "key")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (errors.TransportError("P2 POST /forward: cannot connect"), 503, "upstream_unavailable"),
        (errors.ServerError("P2: 503 not_ready", code="not_ready", status=503), 503, "not_ready"),
        (errors.ServerError("P2: 500", status=500), 502, "upstream_error"),
        (errors.KeyOutdated("rotation in progress", code="key_outdated", status=409), 503, "key_outdated"),
        (errors.SessionExpired("gone", code="session_expired", status=410), 503, "session_expired"),
        (errors.RateLimited("too many sessions", status=429), 429, "rate_limit_exceeded"),
        (errors.AuthError("revoked", status=401), 403, "stip_credential_refused"),
        (errors.BadRequest("bad shape", code="bad_request", status=400), 400, "bad_request"),
        (errors.NotFound("no deployment", status=404), 502, "upstream_error"),
        (errors.StipError("odd"), 502, "upstream_error"),
    ],
)
def test_sdk_errors_map_to_openai_statuses(error: errors.StipError, status: int, code: str) -> None:
    mapped = from_stip(error, "llama")
    assert (mapped.status, mapped.code) == (status, code)
    body = mapped.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and "llama" in body["message"]
