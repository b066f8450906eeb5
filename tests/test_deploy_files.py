"""docker-compose.yml and the Dockerfile: valid, and running what the end-to-end test runs."""

import copy
import json
import stat
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.e2e.processes import CLOUD, DEVELOPER, USER, VALUE_FLAGS

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "tests" / "fixtures" / "compose-spec.json").read_text())
VALIDATOR = jsonschema.Draft201909Validator(SCHEMA)  # the draft the schema declares


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _shape(command: list[str]) -> list[str]:
    """A command with the values of host, port, directory and URL flags blanked out."""
    out = list(command)
    for i, arg in enumerate(out[:-1]):
        if arg in VALUE_FLAGS:
            out[i + 1] = "<value>"
    return out


def test_compose_file_follows_the_compose_schema(compose: dict) -> None:
    VALIDATOR.validate(compose)


def test_schema_check_would_catch_a_broken_file(compose: dict) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["cloud-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] = ["one"]
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(broken)
    broken = copy.deepcopy(compose)
    broken["services"]["developer"]["healthchek"] = {}
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(broken)


def test_containers_run_the_commands_the_end_to_end_test_starts(compose: dict) -> None:
    services = compose["services"]
    assert _shape(services["cloud-gpu"]["command"]) == _shape(CLOUD)
    assert _shape(services["cloud-cpu"]["command"]) == _shape(CLOUD)
    assert _shape(services["developer"]["command"]) == _shape(DEVELOPER)
    assert _shape(services["user"]["command"]) == _shape(USER)


def test_gpu_reservation_cpu_fallback_health_and_secrets(compose: dict) -> None:
    services = compose["services"]
    devices = services["cloud-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "deploy" not in services["cloud-cpu"] and services["cloud-cpu"]["environment"]["STIP_CLOUD_DEVICE"] == "cpu"
    for name in ("cloud-gpu", "cloud-cpu", "developer"):
        assert "/health/ready" in " ".join(services[name]["healthcheck"]["test"])
    # every secret a service uses is declared, and tokens arrive only as files
    for name, svc in services.items():
        for secret in svc.get("secrets", []):
            assert secret in compose["secrets"], (name, secret)
        for var, value in svc.get("environment", {}).items():
            if "TOKEN" in var:
                assert var.endswith("_FILE") and str(value).startswith("/run/secrets/"), (name, var)
    # both cloud variants answer to the name the others use
    for name in ("cloud-gpu", "cloud-cpu"):
        assert "cloud" in services[name]["networks"]["default"]["aliases"]
        assert "--port" in services[name]["command"]
    assert "http://cloud:8002" in services["user"]["command"]
    # named volumes for state
    assert set(compose["volumes"]) >= {"cloud-data", "developer-data"}


def test_dockerfile_pins_torch_and_installs_the_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert (
        "torch==2.13.0" in text and "pip install '.[demo]'" in text
    )  # the compose file runs `stip demo` in this image
    for package in ("shared", "stip_http", "stip_demo", "developer_service", "cloud_service", "user_client"):
        assert f"COPY {package} ./{package}" in text


def test_make_secrets_writes_the_tokens_compose_reads(compose: dict, tmp_path: Path) -> None:
    """docker-compose.yml points at `make secrets`: the target exists and writes what the file names."""
    assert "make secrets" in (ROOT / "docker-compose.yml").read_text()
    run = ["make", "-s", "-f", str(ROOT / "Makefile"), "-C", str(tmp_path), "secrets"]
    subprocess.run(run, check=True, capture_output=True, timeout=60)
    files = {name: tmp_path / spec["file"] for name, spec in compose["secrets"].items()}
    assert set(files) == {"admin_token", "push_token"}
    tokens = {name: path.read_text().strip() for name, path in files.items()}
    assert len(set(tokens.values())) == 2 and all(len(t) >= 32 for t in tokens.values())
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in files.values())
    subprocess.run(run, check=True, capture_output=True, timeout=60)  # a second run keeps them
    assert {name: path.read_text().strip() for name, path in files.items()} == tokens
