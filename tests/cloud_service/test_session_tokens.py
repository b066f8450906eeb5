"""A session's token authenticates its forward steps in place of the user credential.

P2 keeps the claims of the credential that opened the session and checks them on every step
as it checks the credential itself: a revoked or expired credential's sessions are refused at
once. Which token opens what (another session's token, another deployment's, a token on other
routes) is in the authorization matrix, tests/hardening/test_authz_matrix.py.
"""

import logging
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from fastapi.testclient import TestClient

from cloud_service import service as service_module
from shared.api import E_SESSION_EXPIRED, E_UNAUTHORIZED, LOGITS, META_SESSION_LENGTH
from shared.credentials import Signer
from shared.permutation import unpermute
from tests.cloud_service import helpers
from tests.cloud_service.helpers import DEPLOYMENT, Deployed, assert_error, decoded, forward
from tests.cloud_service.test_revocations import put_revocations
from tests.support import max_abs_diff

IDS = torch.tensor([[5, 17, 3, 44, 9, 21]])  # a prompt of the tiny Llama, then its steps one by one


def open_session(client: TestClient, credential: str) -> dict[str, Any]:
    reply = client.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers={"Authorization": f"Bearer {credential}"})
    assert reply.status_code == 201, reply.text
    created: dict[str, Any] = reply.json()
    return created


def test_steps_with_the_token_equal_steps_with_the_credential_and_the_stock_model(
    deployed: TestClient, credential: str, original: transformers.PreTrainedModel, v1: Deployed
) -> None:
    a, b = open_session(deployed, credential), open_session(deployed, credential)
    assert len(a["session_token"]) == 22 and "." not in a["session_token"]  # 16 random bytes, base64url
    assert a["session_token"] != b["session_token"]
    x = helpers.embeds(original, IDS, v1.pi)
    with torch.no_grad():
        expected = original(IDS).logits  # (1, 6, V)
    steps = [(0, 3), (3, 4), (4, 5), (5, 6)]  # a prefill of 3, then one token at a time
    for i, (start, end) in enumerate(steps):
        part = {name: t[:, start:end] for name, t in x.items()}
        # session a: its token, except one step with the credential (still accepted: the contract)
        token = credential if i == 2 else a["session_token"]
        out_a, meta_a = decoded(forward(deployed, token, part, session_id=a["session_id"], output="all"))
        out_b, meta_b = decoded(forward(deployed, credential, part, session_id=b["session_id"], output="all"))
        assert meta_a[META_SESSION_LENGTH] == meta_b[META_SESSION_LENGTH] == str(end)
        assert torch.equal(out_a[LOGITS], out_b[LOGITS])
        assert max_abs_diff(unpermute(out_a[LOGITS], v1.pi_c), expected[:, start:end]) <= 1e-4


def test_a_revoked_credentials_sessions_are_refused_at_once(
    deployed: TestClient, signer: Signer, original: transformers.PreTrainedModel, v1: Deployed
) -> None:
    token, claims = signer.issue(subject="dave", deployment_id=DEPLOYMENT, ttl_s=3600)
    session = open_session(deployed, token)
    step = {name: t[:, :1] for name, t in helpers.embeds(original, IDS, v1.pi).items()}
    decoded(forward(deployed, session["session_token"], step, session_id=session["session_id"]))
    assert put_revocations(deployed, [(claims.jti, claims.exp)]).status_code == 200
    reply = forward(deployed, session["session_token"], step, session_id=session["session_id"])
    assert "revoked" in assert_error(reply, 401, E_UNAUTHORIZED)
    assert reply.headers["www-authenticate"] == "Bearer"


def test_an_expired_credentials_sessions_are_refused_at_once(
    deployed: TestClient,
    signer: Signer,
    original: transformers.PreTrainedModel,
    v1: Deployed,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token, _ = signer.issue(subject="erin", deployment_id=DEPLOYMENT, ttl_s=60)
    session = open_session(deployed, token)
    step = {name: t[:, :1] for name, t in helpers.embeds(original, IDS, v1.pi).items()}
    decoded(forward(deployed, session["session_token"], step, session_id=session["session_id"]))
    now = time.time()
    monkeypatch.setattr(service_module.time, "time", lambda: now + 61)  # the credential's expiry has passed
    reply = forward(deployed, session["session_token"], step, session_id=session["session_id"])
    assert "expired" in assert_error(reply, 401, E_UNAUTHORIZED)


@pytest.fixture
def clock() -> helpers.FakeClock:
    return helpers.FakeClock()


@pytest.fixture
def short_lived(tmp_path: Path, v1: Deployed, signer: Signer, clock: helpers.FakeClock) -> Iterator[TestClient]:
    """P2 whose sessions expire after 60 s idle (its clock is the test's)."""
    with helpers.serve(tmp_path / "data", clock=clock, session_idle_ttl_s=60) as client:
        assert helpers.push(client, *v1.body(signer)).status_code == 200
        yield client


def test_an_expired_sessions_token_is_refused_and_its_credential_hears_why(
    short_lived: TestClient,
    credential: str,
    clock: helpers.FakeClock,
    original: transformers.PreTrainedModel,
    v1: Deployed,
) -> None:
    session = open_session(short_lived, credential)
    step = {name: t[:, :1] for name, t in helpers.embeds(original, IDS, v1.pi).items()}
    decoded(forward(short_lived, session["session_token"], step, session_id=session["session_id"]))
    clock.now += 61
    reply = forward(short_lived, session["session_token"], step, session_id=session["session_id"])
    assert "session token" in assert_error(reply, 401, E_UNAUTHORIZED)
    # the SDK then asks with the credential (user_client.client): P2 says the session expired
    assert_error(forward(short_lived, credential, step, session_id=session["session_id"]), 410, E_SESSION_EXPIRED)


def test_tokens_are_never_logged(
    caplog: pytest.LogCaptureFixture, deployed: TestClient, credential: str, original: Any, v1: Deployed
) -> None:
    """(Compared in constant time: tests/hardening/test_authz_matrix.py, with the other tokens.)"""
    caplog.set_level(logging.DEBUG)
    session = open_session(deployed, credential)
    token, sid = session["session_token"], session["session_id"]
    step = {name: t[:, :1] for name, t in helpers.embeds(original, IDS, v1.pi).items()}
    decoded(forward(deployed, token, step, session_id=sid))
    wrong = secrets.token_urlsafe(16)
    assert_error(forward(deployed, wrong, step, session_id=sid), 401, E_UNAUTHORIZED)
    assert caplog.records  # P2 did log these calls, at DEBUG
    assert token not in caplog.text and wrong not in caplog.text
