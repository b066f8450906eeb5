"""Deleting a deployment on P2 (P1's `DELETE /v1/deployments/{id}` with the push token)."""

from pathlib import Path

import torch
import transformers
from fastapi.testclient import TestClient

from shared.api import E_NOT_FOUND, E_UNAUTHORIZED
from shared.credentials import Signer
from tests.cloud_service import helpers
from tests.cloud_service.helpers import DEPLOYMENT, PUSH_TOKEN, Deployed, Reply


def delete(client: TestClient, *, token: str | None = PUSH_TOKEN, deployment_id: str = DEPLOYMENT) -> Reply:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.delete(f"/v1/deployments/{deployment_id}", headers=headers)


def test_delete_removes_the_weights_the_sessions_and_the_files(
    tmp_path: Path, v1: Deployed, signer: Signer, original: transformers.PreTrainedModel
) -> None:
    credential, _ = signer.issue(subject="alice", deployment_id=DEPLOYMENT, ttl_s=3600)
    auth = {"Authorization": f"Bearer {credential}"}
    request = helpers.embeds(original, torch.tensor([[3, 5, 7]]), v1.pi)
    data = tmp_path / "data"
    with helpers.serving(data, v1, signer) as client:
        session = client.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers=auth).json()["session_id"]
        revoked = {"revoked": [{"jti": "gone", "expires_at": 2**40}]}
        assert (
            client.put(
                f"/v1/deployments/{DEPLOYMENT}/revocations",
                json=revoked,
                headers={"Authorization": f"Bearer {PUSH_TOKEN}"},
            ).status_code
            == 200
        )
        assert (data / "deployments" / DEPLOYMENT / "active.json").is_file()

        # only P1's push token may delete
        helpers.assert_error(delete(client, token=None), 401, E_UNAUTHORIZED)
        helpers.assert_error(delete(client, token="wrong"), 401, E_UNAUTHORIZED)
        assert helpers.forward(client, credential, request, output="last").status_code == 200

        reply = delete(client)
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"deployment_id": DEPLOYMENT, "sessions_ended": 1}
        helpers.assert_error(client.get(f"/v1/deployments/{DEPLOYMENT}"), 404, E_NOT_FOUND)
        helpers.assert_error(helpers.forward(client, credential, request, output="last"), 404, E_NOT_FOUND)
        helpers.assert_error(helpers.forward(client, credential, request, session_id=session), 404, E_NOT_FOUND)
        assert not (data / "deployments" / DEPLOYMENT).exists()
        assert sorted(p.name for p in (data / "deployments").iterdir()) == []
        assert list((data / "tmp").iterdir()) == []
        assert client.get("/health/ready").json()["deployments"] == 0
        # a second delete: nothing left, 404 (which P1 takes as done)
        helpers.assert_error(delete(client), 404, E_NOT_FOUND)

    with helpers.serve(data) as client:  # nothing comes back after a restart
        helpers.assert_error(client.get(f"/v1/deployments/{DEPLOYMENT}"), 404, E_NOT_FOUND)


def test_a_delete_cut_after_active_json_leaves_nothing_loadable(tmp_path: Path, v1: Deployed, signer: Signer) -> None:
    """A crash between removing active.json and the rest: the restart loads nothing and removes the version
    file; P1's retry then finds nothing (404, which P1 takes as done)."""
    data = tmp_path / "data"
    with helpers.serving(data, v1, signer):
        pass
    (data / "deployments" / DEPLOYMENT / "active.json").unlink()  # what remove_deployment does first
    with helpers.serve(data) as client:
        helpers.assert_error(client.get(f"/v1/deployments/{DEPLOYMENT}"), 404, E_NOT_FOUND)
        assert not (data / "deployments" / DEPLOYMENT).exists()
        helpers.assert_error(delete(client), 404, E_NOT_FOUND)  # P1's retry
