"""Deleting deployments and models: P1 in process, pushing to a real P2 in process.

P2's data directory is checked afterwards; a P2 that is down at delete time is told later,
also across a restart of P1 (the delete is marked durably before anything is removed).
"""

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from developer_service.app import create_app
from tests.cloud_service.helpers import serve as serve_cloud
from tests.developer_service.conftest import CLOUD_URL, PUSH, admin, bearer, deploy, issue, settings_for


class Switchable(httpx.BaseTransport):
    """P1's way to the in-process P2, with an off switch (P2 unreachable)."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner, self.down = inner, False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("P2 is down (test)", request=request)
        response = self.inner.handle_request(request)
        return httpx.Response(response.status_code, headers=response.headers, content=response.read())


@dataclass
class Stack:
    """P2 in process (data in `root/cloud`), and P1's switchable way to it."""

    root: Path
    p2: TestClient
    transport: Switchable

    @contextmanager
    def developer(self) -> Iterator[TestClient]:
        """P1 in process (data in `root/p1`), pushing to P2 through `transport`; again after a stop."""
        with TestClient(create_app(settings_for(self.root / "p1"), transport=self.transport)) as client:
            yield client


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with serve_cloud(tmp_path / "cloud", push_token=PUSH) as p2:
        yield Stack(tmp_path, p2, Switchable(p2._transport))


def p2_deployments(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cloud" / "deployments").iterdir())


def test_delete_deployment_removes_it_on_both_sides(tmp_path: Path, model_dir: Path, stack: Stack) -> None:
    p2 = stack.p2
    with stack.developer() as p1:
        dep = deploy(p1, model_dir)
        dep_id = dep["deployment_id"]
        assert dep["status"] == "active", dep
        credential = issue(p1, dep_id, name="alice")
        assert p1.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(credential)).status_code == 200
        session = p2.post(f"/v1/deployments/{dep_id}/sessions", headers=bearer(credential))
        assert session.status_code == 201, session.text
        assert p2_deployments(tmp_path) == [dep_id]
        assert (tmp_path / "p1" / "deployments" / dep_id).is_dir()

        assert p1.delete(f"/v1/deployments/{dep_id}").status_code == 401  # admin only
        reply = p1.delete(f"/v1/deployments/{dep_id}", headers=admin())
        assert reply.status_code == 200, reply.text
        assert reply.json() == {
            "deployment_id": dep_id,
            "status": "deleted",
            "credentials_revoked": 1,
            "cloud_deleted": True,
        }
        # P1: no record, no key material, no credential; the credential is refused
        assert p1.get(f"/v1/deployments/{dep_id}", headers=admin()).status_code == 404
        assert p1.get("/v1/deployments", headers=admin()).json() == []
        assert not (tmp_path / "p1" / "deployments" / dep_id).exists()
        state = json.loads((tmp_path / "p1" / "state.json").read_text())
        assert state["deployments"] == {} and state["credentials"] == {}
        assert p1.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(credential)).status_code == 401
        # P2: θ′, its files and the session are gone
        assert p2.get(f"/v1/deployments/{dep_id}").status_code == 404
        assert p2_deployments(tmp_path) == []
        forward = p2.post(f"/v1/deployments/{dep_id}/sessions", headers=bearer(credential))
        assert forward.status_code == 404
        # deleting again: unknown
        assert p1.delete(f"/v1/deployments/{dep_id}", headers=admin()).status_code == 404


def test_delete_model_is_refused_while_a_deployment_uses_it(model_dir: Path, stack: Stack) -> None:
    with stack.developer() as p1:
        dep = deploy(p1, model_dir)
        model_id, dep_id = dep["model_id"], dep["deployment_id"]
        reply = p1.delete(f"/v1/models/{model_id}", headers=admin())
        assert reply.status_code == 409
        message = reply.json()["error"]["message"]
        assert dep_id in message and "stip-developer delete-deployment" in message
        assert p1.delete(f"/v1/deployments/{dep_id}", headers=admin()).status_code == 200
        reply = p1.delete(f"/v1/models/{model_id}", headers=admin())
        assert reply.status_code == 200 and reply.json() == {"model_id": model_id, "path": str(model_dir.resolve())}
        assert p1.get(f"/v1/models/{model_id}", headers=admin()).status_code == 404
        assert (model_dir / "config.json").is_file()  # the owner's directory is never touched
        assert p1.delete(f"/v1/models/{model_id}", headers=admin()).status_code == 404


def test_p2_down_at_delete_is_told_later_also_after_a_restart(tmp_path: Path, model_dir: Path, stack: Stack) -> None:
    p2, transport = stack.p2, stack.transport
    with stack.developer() as p1:
        dep_id = deploy(p1, model_dir)["deployment_id"]
        credential = issue(p1, dep_id)
        transport.down = True
        reply = p1.delete(f"/v1/deployments/{dep_id}", headers=admin())
        assert reply.status_code == 200, reply.text
        assert reply.json()["status"] == "deleting" and reply.json()["cloud_deleted"] is False
        status = p1.get(f"/v1/deployments/{dep_id}", headers=admin()).json()
        assert status["status"] == "deleting" and CLOUD_URL in status["error"]
        # already gone on P1: no bundle, no credential, no rotation, no key material
        assert p1.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(credential)).status_code == 401
        assert p1.post(f"/v1/deployments/{dep_id}/rotate", headers=admin()).status_code == 404
        assert not (tmp_path / "p1" / "deployments" / dep_id).exists()
        assert p2_deployments(tmp_path) == [dep_id]  # P2 still holds θ′
        again = p1.delete(f"/v1/deployments/{dep_id}", headers=admin())  # asking again is harmless
        assert again.status_code == 200 and again.json()["status"] == "deleting"
    # P1 stopped (or crashed) before P2 confirmed: the durable `deleting` mark finishes it on restart
    transport.down = False
    with stack.developer() as p1:
        deadline = time.monotonic() + 30
        while p1.get(f"/v1/deployments/{dep_id}", headers=admin()).status_code != 404:
            assert time.monotonic() < deadline, "P1 never finished the delete"
            time.sleep(0.1)
        assert p2.get(f"/v1/deployments/{dep_id}").status_code == 404
        assert p2_deployments(tmp_path) == []
