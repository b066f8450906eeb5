"""Revocation on P2: P1's list of revoked credentials, refused before they expire, kept on disk."""

import json
import stat
import time
from pathlib import Path

import torch
import transformers
from fastapi.testclient import TestClient

from shared.api import E_NOT_FOUND, E_UNAUTHORIZED, Revocations
from shared.credentials import Signer
from tests.cloud_service import helpers
from tests.cloud_service.helpers import DEPLOYMENT, PUSH_TOKEN, Deployed, Reply


def put_revocations(
    client: TestClient,
    entries: list[tuple[str, int]],
    *,
    token: str | None = PUSH_TOKEN,
    deployment_id: str = DEPLOYMENT,
) -> Reply:
    body = {"revoked": [{"jti": jti, "expires_at": exp} for jti, exp in entries]}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.put(f"/v1/deployments/{deployment_id}/revocations", json=body, headers=headers)


def works(client: TestClient, credential: str, request: dict[str, torch.Tensor]) -> bool:
    reply = helpers.forward(client, credential, request, output="last")
    if reply.status_code == 401:
        assert "revoked" in helpers.assert_error(reply, 401, E_UNAUTHORIZED)
        return False
    assert reply.status_code == 200, reply.text
    return True


def test_revoked_credentials_are_refused_until_they_expire(
    tmp_path: Path, v1: Deployed, signer: Signer, original: transformers.PreTrainedModel
) -> None:
    alice, alice_claims = signer.issue(subject="alice", deployment_id=DEPLOYMENT, ttl_s=3600)
    bob, _ = signer.issue(subject="bob", deployment_id=DEPLOYMENT, ttl_s=3600)
    request = helpers.embeds(original, torch.tensor([[3, 5, 7]]), v1.pi)
    data = tmp_path / "data"
    with helpers.serving(data, v1, signer) as client:
        assert works(client, alice, request) and works(client, bob, request)

        long_gone = int(time.time()) - 10  # an entry already expired is dropped, not kept forever
        reply = put_revocations(client, [(alice_claims.jti, alice_claims.exp), ("0123abcd", long_gone)])
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"deployment_id": DEPLOYMENT, "revoked": 1}
        assert not works(client, alice, request) and works(client, bob, request)
        sessions = f"/v1/deployments/{DEPLOYMENT}/sessions"
        refused = client.post(sessions, headers={"Authorization": f"Bearer {alice}"})
        assert "revoked" in helpers.assert_error(refused, 401, E_UNAUTHORIZED)

    stored = data / "deployments" / DEPLOYMENT / "revoked.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert Revocations.model_validate_json(stored.read_bytes()).revoked[0].jti == alice_claims.jti
    assert alice not in stored.read_text()  # P2 keeps ids, never tokens
    with helpers.serve(data) as client:  # a restart keeps the list
        assert not works(client, alice, request) and works(client, bob, request)
        # the list replaces the last one: P1 sends all that are revoked, so an empty list reinstates
        assert put_revocations(client, []).json()["revoked"] == 0
        assert works(client, alice, request)
    assert json.loads(stored.read_text()) == {"revoked": []}


def test_only_p1_sends_revocations(deployed: TestClient, credential: str) -> None:
    for token in (None, credential, PUSH_TOKEN + "x"):
        helpers.assert_error(put_revocations(deployed, [("0123abcd", 2**40)], token=token), 401, E_UNAUTHORIZED)
    helpers.assert_error(put_revocations(deployed, [], deployment_id="dep-nope"), 404, E_NOT_FOUND)
    bad = deployed.put(
        f"/v1/deployments/{DEPLOYMENT}/revocations",
        json={"revoked": [{"jti": "", "expires_at": 1}]},
        headers={"Authorization": f"Bearer {PUSH_TOKEN}"},
    )
    assert bad.status_code == 422 and set(bad.json()["error"]) == {"code", "message"}


def test_an_unreadable_list_does_not_keep_p2_from_serving(
    tmp_path: Path, v1: Deployed, signer: Signer, original: transformers.PreTrainedModel
) -> None:
    alice, claims = signer.issue(subject="alice", deployment_id=DEPLOYMENT, ttl_s=3600)
    request = helpers.embeds(original, torch.tensor([[3, 5, 7]]), v1.pi)
    data = tmp_path / "data"
    with helpers.serving(data, v1, signer) as client:
        assert put_revocations(client, [(claims.jti, claims.exp)]).status_code == 200
    (data / "deployments" / DEPLOYMENT / "revoked.json").write_text('{"revoked": [')  # a disk fault
    with helpers.serve(data) as client:  # the deployment still serves; the next list from P1 restores the refusal
        assert works(client, alice, request)
        assert put_revocations(client, [(claims.jti, claims.exp)]).status_code == 200
        assert not works(client, alice, request)
