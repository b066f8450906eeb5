"""Sessions: bounded in number and in KV cache memory, expiring when idle."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from fastapi.testclient import TestClient

from shared.api import E_NOT_FOUND, E_SESSION_EXPIRED, E_TOO_MANY_SESSIONS, INPUTS_EMBEDS, LOGITS
from shared.credentials import Signer
from shared.permutation import unpermute
from tests.cloud_service import helpers
from tests.cloud_service.helpers import DEPLOYMENT, D, Deployed, FakeClock, V
from tests.support import max_abs_diff

TTL = 60
# one token of one row: keys and values, 2 layers, 2 KV heads of 8 dims, float32
TOKEN_BYTES = 2 * 2 * 2 * 8 * 4


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def small(tmp_path: Path, v1: Deployed, signer: Signer, clock: FakeClock) -> Iterator[TestClient]:
    """P2 with room for 2 sessions and 10 cached tokens, sessions idle for 60 s expire."""
    limits = dict(max_sessions=2, session_idle_ttl_s=TTL, session_memory_bytes=10 * TOKEN_BYTES)
    with helpers.serving(tmp_path / "data", v1, signer, clock=clock, **limits) as client:
        yield client


def create(client: TestClient, credential: str) -> str:
    response = client.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers={"Authorization": f"Bearer {credential}"})
    assert response.status_code == 201, response.text
    return str(response.json()["session_id"])


def test_too_many_sessions(small: TestClient, credential: str) -> None:
    first = create(small, credential)
    create(small, credential)
    response = small.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers={"Authorization": f"Bearer {credential}"})
    assert "2 sessions" in helpers.assert_error(response, 429, E_TOO_MANY_SESSIONS)
    assert small.delete(f"/v1/sessions/{first}", headers={"Authorization": f"Bearer {credential}"}).status_code == 204
    create(small, credential)


def test_cache_memory_is_bounded(
    small: TestClient, credential: str, original: transformers.PreTrainedModel, v1: Deployed
) -> None:
    a, b = create(small, credential), create(small, credential)
    ids = torch.randint(0, V, (1, 8))
    helpers.decoded(
        helpers.forward(small, credential, helpers.embeds(original, ids, v1.pi), session_id=a)
    )  # 8 of 10 tokens
    response = helpers.forward(small, credential, helpers.embeds(original, ids[:, :3], v1.pi), session_id=b)
    assert "memory" in helpers.assert_error(response, 429, E_TOO_MANY_SESSIONS)
    service = small.app.state.service  # type: ignore[attr-defined]
    assert service.sessions.used_bytes == 8 * TOKEN_BYTES  # measured from the cache itself
    helpers.decoded(
        helpers.forward(small, credential, helpers.embeds(original, ids[:, :2], v1.pi), session_id=b)
    )  # 10 of 10
    helpers.decoded(
        helpers.forward(small, credential, helpers.embeds(original, ids, v1.pi))
    )  # stateless needs no session memory
    auth = {"Authorization": f"Bearer {credential}"}
    assert small.delete(f"/v1/sessions/{a}", headers=auth).status_code == 204
    assert service.sessions.used_bytes == 2 * TOKEN_BYTES
    helpers.decoded(helpers.forward(small, credential, helpers.embeds(original, ids[:, :3], v1.pi), session_id=b))


def test_idle_sessions_expire(
    small: TestClient, credential: str, clock: FakeClock, original: transformers.PreTrainedModel, v1: Deployed
) -> None:
    ids = torch.randint(0, V, (1, 3))
    with torch.no_grad():
        ref = original(input_ids=ids).logits
    session = create(small, credential)
    helpers.decoded(helpers.forward(small, credential, helpers.embeds(original, ids[:, :2], v1.pi), session_id=session))
    clock.now += TTL - 1  # used just in time: the TTL counts from the last use
    tensors, _ = helpers.decoded(
        helpers.forward(
            small, credential, helpers.embeds(original, ids[:, 2:], v1.pi), session_id=session, output="last"
        )
    )
    assert max_abs_diff(unpermute(tensors[LOGITS], v1.pi_c), ref[:, -1:]) <= 1e-4
    clock.now += TTL + 1
    step = helpers.forward(small, credential, {INPUTS_EMBEDS: torch.randn(1, 1, D)}, session_id=session)
    helpers.assert_error(step, 410, E_SESSION_EXPIRED)
    helpers.assert_error(step, 410, E_SESSION_EXPIRED)
    auth = {"Authorization": f"Bearer {credential}"}
    helpers.assert_error(small.delete(f"/v1/sessions/{session}", headers=auth), 410, E_SESSION_EXPIRED)
    helpers.assert_error(small.delete(f"/v1/sessions/{session}", headers=auth), 404, E_NOT_FOUND)


def test_expired_sessions_make_room(small: TestClient, credential: str, clock: FakeClock) -> None:
    service = small.app.state.service  # type: ignore[attr-defined]
    create(small, credential)
    create(small, credential)
    clock.now += TTL + 1
    create(small, credential)  # the full store evicts the expired first
    assert service.sessions.count == 1
    clock.now += TTL + 1
    assert service.sessions.evict_expired() == 1  # what the background sweeper runs
    assert service.sessions.count == 0
