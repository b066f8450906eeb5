"""`stip-developer`: the offline transform, settings, and the client subcommands against a live P1."""

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import uvicorn

from developer_service.app import create_app
from developer_service.cli import main
from developer_service.settings import DeveloperSettings, load_client_settings
from shared.keys import DeveloperKey
from tests.developer_service.conftest import ADMIN, CLOUD_URL, PUSH, FakeCloud, settings_for

ROOT = Path(__file__).resolve().parents[2]


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}")))


# --- transform ------------------------------------------------------------------------------------


def test_transform_writes_the_three_sides(model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["transform", str(model_dir), "--out", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["family"] == "llama" and summary["key_version"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["cloud", "developer", "user"]
    key = out / "developer" / "key.safetensors"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert DeveloperKey.load(key).user.fingerprint == summary["fingerprint"]
    assert (out / "user" / "tokenizer.json").is_file() and (out / "cloud" / "config.json").is_file()
    # a second run refuses to overwrite, clearly
    assert main(["transform", str(model_dir), "--out", str(out), "--quiet"]) == 2
    assert "not empty" in (err := capsys.readouterr().err) and "--overwrite" in err


def test_transform_without_config_fails_cleanly(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "model"
    bad.mkdir()
    assert main(["transform", str(bad), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {bad} has no config.json: not a Hugging Face model directory\n"
    assert captured.out == "" and _leftovers(tmp_path, "out") == []
    # a directory that is not there is reported as missing, not as lacking a config.json
    assert main(["transform", str(tmp_path / "typo"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"model directory {tmp_path / 'typo'} does not exist" in err and "config.json" not in err


def test_transform_unknown_architecture_in_a_subprocess(tmp_path: Path) -> None:
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    run = subprocess.run(
        [sys.executable, "-m", "developer_service", "transform", str(bad), "--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: unsupported architecture ['MambaForCausalLM']")
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert _leftovers(tmp_path, "out") == []


# --- settings ---------------------------------------------------------------------------------------


def test_settings_from_environment_and_secret_files(tmp_path: Path, monkeypatch) -> None:
    admin_file = tmp_path / "admin_token"
    admin_file.write_text(ADMIN + "\n")
    monkeypatch.setenv("STIP_DEVELOPER_ADMIN_TOKEN_FILE", str(admin_file))
    monkeypatch.setenv("STIP_DEVELOPER_PUSH_TOKEN", PUSH)
    monkeypatch.setenv("STIP_DEVELOPER_PUBLIC_CLOUD_URL", "https://cloud.example/")
    monkeypatch.setenv("STIP_DEVELOPER_LOG_LEVEL", "debug")
    s = DeveloperSettings()
    assert s.port == 8001 and s.credential_ttl_s == 30 * 86_400
    assert s.admin_token is not None and s.admin_token.get_secret_value() == ADMIN
    assert s.push_token is not None and s.push_token.get_secret_value() == PUSH
    assert s.public_cloud_url == "https://cloud.example" and s.log_level == "DEBUG"
    assert ADMIN not in repr(s) and PUSH not in repr(s)
    monkeypatch.setenv("STIP_DEVELOPER_ADMIN_TOKEN", "also-set")
    with pytest.raises(ValueError, match="not both"):
        DeveloperSettings()
    # a token on the command line replaces both environment variants
    client = load_client_settings(admin_token="from-flag")
    assert client.admin_token is not None and client.admin_token.get_secret_value() == "from-flag"


def test_serve_refuses_a_bad_configuration(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("STIP_DEVELOPER_PUSH_TOKEN_FILE", str(tmp_path / "missing"))
    assert main(["serve", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid configuration:") and "cannot read" in err
    monkeypatch.delenv("STIP_DEVELOPER_PUSH_TOKEN_FILE")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "state.json").write_text("{broken")
    assert main(["serve", "--data-dir", str(tmp_path / "data")]) == 2
    assert "cannot load P1's state" in capsys.readouterr().err


# --- client subcommands against a live P1 ----------------------------------------------------------


@pytest.fixture
def live_p1(tmp_path: Path) -> Iterator[str]:
    """P1 on a loopback port (uvicorn in a thread), pushing to a fake P2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(settings_for(tmp_path / "data"), transport=FakeCloud().transport)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "P1 did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_client_commands(live_p1: str, model_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    token_file = tmp_path / "admin_token"
    token_file.write_text(ADMIN)
    base = ["--developer-url", live_p1, "--admin-token-file", str(token_file)]

    def run(*args: str) -> tuple[int, str, str]:
        code = main([*args, *base])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, _ = run("register", str(model_dir), "--name", "tiny")
    assert code == 0
    model = json.loads(out)
    assert model["name"] == "tiny" and model["family"] == "llama"
    code, out, _ = run("deploy", model["model_id"], "--cloud-url", CLOUD_URL, "--wait", "--poll-s", "0.05")
    assert code == 0
    status = json.loads(out)
    assert status["status"] == "active" and status["key_version"] == 1
    dep_id = status["deployment_id"]

    code, out, err = run("issue-credential", dep_id, "--name", "alice", "--ttl-s", "600")
    assert code == 0 and out.startswith("stip1.") and out.count("\n") == 1 and "alice" not in out
    # the expiry as an ISO date, about ten minutes from now
    expires = datetime.fromisoformat(err.split(", expires ")[1].strip())
    assert abs((expires - datetime.now(UTC)).total_seconds() - 600) < 60
    code, out, _ = run("rotate", dep_id, "--wait", "--poll-s", "0.05")
    assert code == 0 and json.loads(out)["key_version"] == 2
    code, out, _ = run("status", dep_id)
    assert code == 0 and json.loads(out)["key_version"] == 2
    code, out, _ = run("credentials", dep_id)
    assert code == 0 and [c["name"] for c in json.loads(out)] == ["alice"]
    code, out, _ = run("deployments")
    assert code == 0 and [d["deployment_id"] for d in json.loads(out)] == [dep_id]

    # failures: a wrong token, an unknown id, a bad directory, an unreachable P1
    assert main(["models", "--developer-url", live_p1, "--admin-token", "wrong"]) == 1
    assert "401" in capsys.readouterr().err
    code, _, err = run("status", "dep-nope")
    assert code == 1 and "dep-nope" in err
    code, _, err = run("register", str(tmp_path))
    assert code == 1 and "no config.json" in err
    monkeypatch.delenv("STIP_DEVELOPER_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("STIP_DEVELOPER_ADMIN_TOKEN_FILE", raising=False)
    assert main(["models", "--developer-url", live_p1]) == 2
    assert "no admin token" in capsys.readouterr().err
    assert main(["models", "--developer-url", "http://127.0.0.1:9", "--admin-token", "x"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach P1 at http://127.0.0.1:9" in err and "--developer-url or STIP_DEVELOPER_URL" in err
