"""Fixtures for P1's tests: a tiny random Llama checkpoint, a fake P2, and app builders."""

import hashlib
import io
import json
import tarfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from developer_service.app import create_app
from developer_service.settings import DeveloperSettings
from shared import api
from shared.wire import decode
from stip_demo.models import copy_tokenizer
from tests.support import TINY_LLAMA, random_causal_lm

ADMIN = "admin-token-for-tests-0123456789"
PUSH = "push-token-for-tests-0123456789"
CLOUD_URL = "http://cloud.test:8002"

LLAMA = TINY_LLAMA


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A random tiny LlamaForCausalLM saved as a Hugging Face directory, with tokenizer files."""
    path = tmp_path_factory.mktemp("llama")
    model = random_causal_lm(LLAMA, seed=1)
    model.save_pretrained(path)
    copy_tokenizer(path)
    return path, model


@pytest.fixture
def model_dir(llama: tuple[Path, torch.nn.Module]) -> Path:
    return llama[0]


@dataclass
class Push:
    headers: httpx.Headers
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    sha256: str


@dataclass
class FakeCloud:
    """P2 as an httpx transport: records every push, checks the token and the digest."""

    pushes: list[Push] = field(default_factory=list)
    fail_with: int | None = None  # answer pushes with this status
    gate: threading.Event | None = None  # hold pushes until set
    pushing: threading.Event = field(default_factory=threading.Event)
    reported: dict[str, int] = field(default_factory=dict)  # what GET /v1/deployments/{id} says
    revocations: dict[str, list[dict[str, object]]] = field(default_factory=dict)  # the lists P1 sent
    refuse_revocations: int | None = None  # answer revocation lists with this status
    load_report: tuple[int, int] | None = None  # (done, total) GET .../weights reports while a push is held
    installing: dict[str, int] = field(default_factory=dict)  # deployment -> key version of the held push

    def handler(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.strip("/").split("/")
        if request.method == "PUT" and len(parts) == 4 and parts[3] == "revocations":
            if request.headers.get("authorization") != f"Bearer {PUSH}":
                return _error(401, api.E_UNAUTHORIZED, "bad push token")
            if self.refuse_revocations is not None:
                return _error(self.refuse_revocations, "refused", "the fake cloud refuses")
            if parts[2] not in self.reported:
                return _error(404, api.E_NOT_FOUND, "unknown deployment")
            body = api.Revocations.model_validate_json(request.read())
            self.revocations[parts[2]] = [r.model_dump() for r in body.revoked]
            return httpx.Response(200, json={"deployment_id": parts[2], "revoked": len(body.revoked)})
        if request.method == "GET" and len(parts) == 3 and parts[:2] == ["v1", "deployments"]:
            version = self.reported.get(parts[2])
            if version is None:
                return _error(404, api.E_NOT_FOUND, "unknown deployment")
            info = api.DeploymentInfo(
                deployment_id=parts[2],
                family="llama",
                d_model=32,
                d_out=61,
                n_layers=2,
                key_version=version,
                status="active",
                device="cpu",
                dtype="float32",
            )
            return httpx.Response(200, json=info.model_dump())
        if request.method == "GET" and len(parts) == 4 and parts[3] == "weights":
            if request.headers.get("authorization") != f"Bearer {PUSH}":
                return _error(401, api.E_UNAUTHORIZED, "bad push token")
            if parts[2] not in self.installing or self.load_report is None:
                return _error(404, api.E_NOT_FOUND, "no push is being installed")
            done, total = self.load_report
            progress = api.LoadProgress(
                deployment_id=parts[2], key_version=self.installing[parts[2]], stage="loading", done=done, total=total
            )
            return httpx.Response(200, json=progress.model_dump())
        if request.method != "PUT" or len(parts) != 4 or parts[3] != "weights":
            return _error(404, api.E_NOT_FOUND, "no such route")
        body = request.read()
        self.installing[parts[2]] = int(request.headers[api.KEY_VERSION_HEADER])
        self.pushing.set()
        if self.gate is not None:
            self.gate.wait(30)
        self.installing.pop(parts[2], None)
        if request.headers.get("authorization") != f"Bearer {PUSH}":
            return _error(401, api.E_UNAUTHORIZED, "bad push token")
        if self.fail_with is not None:
            return _error(self.fail_with, "refused", "the fake cloud refuses")
        digest = hashlib.sha256(body).hexdigest()
        if request.headers[api.DIGEST_HEADER] != digest or int(request.headers["content-length"]) != len(body):
            return _error(400, api.E_BAD_INPUT, "digest or length mismatch")
        tensors, metadata = decode(body)
        self.pushes.append(Push(request.headers, tensors, metadata, digest))
        version = int(metadata[api.PUSH_KEY_VERSION])
        self.reported[parts[2]] = version
        result = api.PushResult(deployment_id=parts[2], key_version=version, status="active", sha256=digest)
        return httpx.Response(200, json=result.model_dump())

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)


def _error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


@pytest.fixture
def cloud() -> FakeCloud:
    return FakeCloud()


def settings_for(data_dir: Path, **overrides: object) -> DeveloperSettings:
    values: dict[str, object] = dict(
        data_dir=data_dir,
        admin_token=ADMIN,
        push_token=PUSH,
        push_attempts=1,
        push_retry_backoff_s=0,
        shard_bytes=20_000,  # several cloud shards even for the tiny model
    )
    values.update(overrides)
    return DeveloperSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def p1(tmp_path: Path, cloud: FakeCloud) -> Callable[..., object]:
    """`with p1() as client:` runs P1 over tmp_path/data (again and again: a restart)."""

    @contextmanager
    def start(**overrides: object) -> Iterator[TestClient]:
        app = create_app(settings_for(tmp_path / "data", **overrides), transport=cloud.transport)
        with TestClient(app) as client:
            yield client

    return start


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def register(client: TestClient, path: Path, name: str | None = None) -> dict:
    r = client.post("/v1/models", json={"path": str(path), "name": name}, headers=admin())
    assert r.status_code in (200, 201), r.text
    return r.json()


def wait(client: TestClient, deployment_id: str) -> dict:
    client.app.state.service.wait(deployment_id, timeout_s=60)  # type: ignore[attr-defined]
    r = client.get(f"/v1/deployments/{deployment_id}", headers=admin())
    assert r.status_code == 200, r.text
    return r.json()


def deploy(client: TestClient, path: Path) -> dict:
    model = register(client, path)
    r = client.post("/v1/deployments", json={"model_id": model["model_id"], "cloud_url": CLOUD_URL}, headers=admin())
    assert r.status_code == 202, r.text
    return wait(client, r.json()["deployment_id"])


def issue(client: TestClient, deployment_id: str, **body: object) -> str:
    r = client.post(f"/v1/deployments/{deployment_id}/users", json=body, headers=admin())
    assert r.status_code == 201, r.text
    return str(r.json()["credential"])


def untar(content: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:") as tar:
        out = {}
        for member in tar.getmembers():
            f = tar.extractfile(member)
            out[member.name] = (member, f.read() if f else b"")
        return out


def manifest(files: dict[str, tuple[tarfile.TarInfo, bytes]]) -> dict:
    return json.loads(files["stip.json"][1])
