"""Health, readiness while reloading, metrics, settings from the environment, the CLI."""

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
import uvicorn
from fastapi.testclient import TestClient
from pydantic import ValidationError

import cloud_service.cli as cli
from cloud_service.app import create_app
from cloud_service.service import CloudService
from cloud_service.settings import CloudSettings, load_settings
from shared.api import E_NOT_READY, INPUTS_EMBEDS
from shared.credentials import Signer
from tests.cloud_service import helpers
from tests.cloud_service.helpers import DEPLOYMENT, PUSH_TOKEN, D, Deployed, V


def test_health_and_metrics(
    deployed: TestClient, credential: str, original: transformers.PreTrainedModel, v1: Deployed
) -> None:
    assert deployed.get("/health/live").json() == {"status": "live", "deployments": None}
    assert deployed.get("/health/ready").json() == {"status": "ready", "deployments": 1}
    session = deployed.post(
        f"/v1/deployments/{DEPLOYMENT}/sessions", headers={"Authorization": f"Bearer {credential}"}
    ).json()["session_id"]
    ids = torch.randint(0, V, (2, 3))
    helpers.decoded(
        helpers.forward(deployed, credential, helpers.embeds(original, ids, v1.pi), session_id=session, output="last")
    )
    helpers.forward(deployed, None, {INPUTS_EMBEDS: torch.randn(1, 1, D)})
    response = deployed.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    forward_route = "/v1/deployments/{deployment_id}/forward"
    assert f'stip_cloud_requests_total{{endpoint="{forward_route}",method="POST",status="200"}} 1.0' in text
    assert f'stip_cloud_requests_total{{endpoint="{forward_route}",method="POST",status="401"}} 1.0' in text
    assert 'stip_cloud_forward_seconds_count{output="last"} 1.0' in text
    assert "stip_cloud_active_sessions 1.0" in text
    assert "stip_cloud_tokens_total 6.0" in text
    assert "stip_cloud_push_bytes_total" in text and "stip_cloud_push_bytes_total 0.0" not in text
    assert 'stip_cloud_pushes_total{outcome="activated"} 1.0' in text
    assert "stip_cloud_deployments 1.0" in text
    assert session not in text and credential not in text


def test_not_ready_until_the_deployments_are_reloaded(
    tmp_path: Path, v1: Deployed, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    with helpers.serving(data, v1, signer):
        pass
    release = threading.Event()
    load_all = CloudService.load_all

    def slow_load_all(self: CloudService) -> None:
        release.wait(10)
        load_all(self)

    monkeypatch.setattr(CloudService, "load_all", slow_load_all)
    with TestClient(create_app(helpers.settings_for(data))) as client:
        assert client.get("/health/live").status_code == 200
        helpers.assert_error(client.get("/health/ready"), 503, E_NOT_READY)
        helpers.assert_error(client.get(f"/v1/deployments/{DEPLOYMENT}"), 503, E_NOT_READY)
        release.set()
        helpers.wait_ready(client)
        assert client.get(f"/v1/deployments/{DEPLOYMENT}").status_code == 200


def test_settings_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "push_token"
    secret.write_text(PUSH_TOKEN + "\n")
    monkeypatch.setenv("STIP_CLOUD_PUSH_TOKEN_FILE", str(secret))
    monkeypatch.setenv("STIP_CLOUD_PORT", "9123")
    monkeypatch.setenv("STIP_CLOUD_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("STIP_CLOUD_DEVICE", "cpu")
    monkeypatch.setenv("STIP_CLOUD_DTYPE", "bfloat16")
    monkeypatch.setenv("STIP_CLOUD_MAX_SESSIONS", "7")
    monkeypatch.setenv("STIP_CLOUD_SESSION_MEMORY_BYTES", "1000")
    monkeypatch.setenv("STIP_CLOUD_LOG_LEVEL", "debug")
    settings = load_settings()
    assert settings.push_token is not None and settings.push_token.get_secret_value() == PUSH_TOKEN
    assert PUSH_TOKEN not in repr(settings)
    assert (settings.port, settings.data_dir, settings.device, settings.dtype) == (
        9123,
        tmp_path / "d",
        "cpu",
        "bfloat16",
    )
    assert (settings.max_sessions, settings.session_memory_bytes, settings.log_level) == (7, 1000, "DEBUG")
    assert load_settings(port=9999).port == 9999  # a CLI flag wins
    monkeypatch.setenv("STIP_CLOUD_PUSH_TOKEN", "x" * 20)
    with pytest.raises(ValidationError, match="not both"):
        load_settings()
    monkeypatch.delenv("STIP_CLOUD_PUSH_TOKEN")
    secret.write_text("\n")
    with pytest.raises(ValidationError, match="empty"):
        load_settings()
    monkeypatch.delenv("STIP_CLOUD_PUSH_TOKEN_FILE")
    with pytest.raises(ValidationError, match="TLS"):
        load_settings(tls_certfile=tmp_path / "cert.pem")
    with pytest.raises(ValidationError):
        load_settings(device="tpu")


def test_defaults() -> None:
    s = CloudSettings(_env_file=None)  # type: ignore[call-arg]
    assert (s.host, s.port, s.device, s.dtype, s.push_token) == ("127.0.0.1", 8002, "auto", "float32", None)


def test_cli_serve_passes_settings_to_uvicorn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.setenv("STIP_CLOUD_HOST", "0.0.0.0")
    monkeypatch.setenv("STIP_CLOUD_PORT", "9001")
    monkeypatch.setenv("STIP_CLOUD_PUSH_TOKEN", PUSH_TOKEN)
    assert cli.main(["serve", "--port", "9002", "--data-dir", str(tmp_path), "--device", "cpu"]) == 0
    app, kw = calls[0]
    assert (kw["host"], kw["port"], kw["ssl_certfile"]) == ("0.0.0.0", 9002, None)
    assert app.state.settings.data_dir == tmp_path and app.state.settings.device == "cpu"


def test_cli_reports_bad_settings_without_the_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STIP_CLOUD_PUSH_TOKEN", PUSH_TOKEN)
    monkeypatch.setenv("STIP_CLOUD_PORT", "not-a-port")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "port" in err and PUSH_TOKEN not in err
