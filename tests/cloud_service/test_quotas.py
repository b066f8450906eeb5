"""Per-user quotas and the response bound of P2 (issue 10 items 3 and 4), in process.

One credential must not take every session slot, the KV cache memory or the forward capacity
of a deployment: each has a per-user limit whose 429 names the setting that raises it. A
forward whose outputs would exceed STIP_CLOUD_MAX_RESPONSE_BYTES is refused (422) before it
runs, and the refusal says to ask for `last` or `topk`.
"""

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import torch
import transformers
from anyio.lowlevel import checkpoint
from fastapi.testclient import TestClient

from cloud_service.admission import Admission
from cloud_service.errors import TooManyForwards
from shared.api import E_TOO_LARGE, E_TOO_MANY_SESSIONS
from shared.credentials import Signer
from tests.cloud_service import helpers
from tests.cloud_service.helpers import DEPLOYMENT, Deployed, V

TOKEN_BYTES = 2 * 2 * 2 * 8 * 4  # KV cache of one token of one row: K and V, 2 layers, 2 KV heads of 8, fp32


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def users(signer: Signer) -> dict[str, str]:
    return {name: signer.issue(subject=name, deployment_id=DEPLOYMENT, ttl_s=3600)[0] for name in ("alice", "bob")}


@pytest.fixture
def p2(request: pytest.FixtureRequest, tmp_path: Path, v1: Deployed, signer: Signer) -> Iterator[TestClient]:
    """P2 serving the tiny Llama; settings overridden by an indirect parameter."""
    with helpers.serving(tmp_path / "data", v1, signer, **getattr(request, "param", {})) as client:
        yield client


def new_session(client: TestClient, token: str) -> object:
    return client.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers=bearer(token))


def test_one_user_cannot_take_every_session_slot(p2: TestClient, users: dict[str, str]) -> None:
    """With the default settings: 16 sessions per user, 256 in all."""
    created = 0
    for _ in range(257):
        r = new_session(p2, users["alice"])
        if r.status_code != 201:  # type: ignore[attr-defined]
            break
        created += 1
    assert created == 16
    message = helpers.assert_error(r, 429, E_TOO_MANY_SESSIONS)
    assert "STIP_CLOUD_MAX_SESSIONS_PER_USER" in message and "per-user" in message
    assert new_session(p2, users["bob"]).status_code == 201  # type: ignore[attr-defined]


@pytest.mark.parametrize("p2", [dict(session_memory_bytes_per_user=6 * TOKEN_BYTES)], indirect=True)
def test_one_user_cannot_take_the_kv_memory(
    p2: TestClient, users: dict[str, str], original: transformers.PreTrainedModel, v1: Deployed
) -> None:
    def step(token: str, session: str, n: int) -> object:
        ids = torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(n))
        return helpers.forward(p2, token, helpers.embeds(original, ids, v1.pi), session_id=session, output="last")

    alice = new_session(p2, users["alice"]).json()["session_id"]  # type: ignore[attr-defined]
    helpers.decoded(step(users["alice"], alice, 5))  # 5 tokens of 6
    message = helpers.assert_error(step(users["alice"], alice, 2), 429, E_TOO_MANY_SESSIONS)
    assert "STIP_CLOUD_SESSION_MEMORY_BYTES_PER_USER" in message
    bob = new_session(p2, users["bob"]).json()["session_id"]  # type: ignore[attr-defined]
    helpers.decoded(step(users["bob"], bob, 5))  # the global bound (4 GiB) is far away: bob is served
    helpers.decoded(step(users["alice"], alice, 1))  # and alice may still use what is left of hers


@pytest.mark.parametrize("p2", [dict(max_forwards_per_user=1)], indirect=True)
def test_one_user_cannot_take_every_forward(
    p2: TestClient, users: dict[str, str], original: transformers.PreTrainedModel, v1: Deployed
) -> None:
    """Alice's one forward in flight (held in the app's own event loop): her next is refused, Bob's runs."""
    body = helpers.embeds(original, torch.tensor([[1, 2, 3]]), v1.pi)
    admission: Admission = p2.app.state.admission  # type: ignore[attr-defined]
    assert p2.portal is not None
    with p2.portal.wrap_async_context_manager(admission.forward(DEPLOYMENT, "alice")):
        message = helpers.assert_error(
            helpers.forward(p2, users["alice"], body, output="last"), 429, "too_many_requests"
        )
        assert "STIP_CLOUD_MAX_FORWARDS_PER_USER" in message
        helpers.decoded(helpers.forward(p2, users["bob"], body, output="last"))
    helpers.decoded(helpers.forward(p2, users["alice"], body, output="last"))  # her slot is free again


def test_a_deployments_body_slots_make_requests_wait_before_their_body_is_read(tmp_path: Path) -> None:
    admission = Admission(helpers.settings_for(tmp_path, forward_bodies=1, max_forwards_per_user=2))
    reading: list[str] = []

    async def request(user: str, release: anyio.Event) -> None:
        async with admission.forward(DEPLOYMENT, user):
            reading.append(user)  # the route reads the body here
            await release.wait()

    async def main() -> None:
        release = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(request, "alice", release)
            tg.start_soon(request, "alice", release)
            tg.start_soon(request, "bob", release)
            for _ in range(20):
                await checkpoint()
            assert reading == ["alice"]  # the others wait for the slot, their bodies unread
            assert admission.in_flight(DEPLOYMENT, "alice") == 2
            with pytest.raises(TooManyForwards, match="STIP_CLOUD_MAX_FORWARDS_PER_USER"):
                async with admission.forward(DEPLOYMENT, "alice"):
                    pass
            release.set()
        assert sorted(reading) == ["alice", "alice", "bob"]
        assert admission.in_flight(DEPLOYMENT, "alice") == admission.in_flight(DEPLOYMENT, "bob") == 0

    anyio.run(main)


def test_the_body_budget_lets_small_bodies_in_together_and_serves_waiters_in_order(tmp_path: Path) -> None:
    """A budget of one 1000-byte body: two declared 400-byte bodies are read at once (as the
    decode steps of concurrent sessions are, to be batched); a chunked body (undeclared: the
    whole 1000) and a 400-byte one after it wait in arrival order; a cancelled waiter gives
    nothing away."""
    admission = Admission(
        helpers.settings_for(tmp_path, forward_bodies=1, max_body_bytes=1000, max_forwards_per_user=8)
    )
    reading: list[str] = []
    releases = {name: anyio.Event() for name in ("a", "b", "chunked", "c", "gone")}

    async def request(name: str, size: int | None) -> None:
        async with admission.forward(DEPLOYMENT, "alice", size):
            reading.append(name)
            await releases[name].wait()

    async def settle() -> None:
        for _ in range(20):
            await checkpoint()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(request, "a", 400)
            tg.start_soon(request, "b", 400)
            await settle()
            assert reading == ["a", "b"]  # 800 of 1000 bytes: both in at once
            tg.start_soon(request, "chunked", None)
            await settle()
            tg.start_soon(request, "c", 150)  # would fit (200 free), but the chunked body came first
            async with anyio.create_task_group() as gone:  # waits behind the others, then is cancelled
                gone.start_soon(request, "gone", 300)
                await settle()
                gone.cancel_scope.cancel()
            await settle()
            assert reading == ["a", "b"]
            releases["a"].set()
            await settle()
            assert reading == ["a", "b"]  # 600 free: the chunked body needs all 1000
            releases["b"].set()
            await settle()
            assert reading == ["a", "b", "chunked"]
            releases["chunked"].set()
            await settle()
            assert reading == ["a", "b", "chunked", "c"]
            releases["c"].set()
        budget = admission._bodies[DEPLOYMENT]
        assert budget.free == budget.total == 1000

    anyio.run(main)


# --- the response bound -------------------------------------------------------------------------

B, S = 2, 5
ALL_LOGITS = B * S * V * 4  # bytes of output=all for a [2, 5, d] float32 request


def tokens_processed(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("stip_cloud_tokens_total "):
            return float(line.split()[1])
    raise AssertionError("no stip_cloud_tokens_total in /metrics")


@pytest.mark.parametrize("p2", [dict(max_response_bytes=ALL_LOGITS - 1)], indirect=True)
def test_a_response_over_the_bound_is_refused_before_the_forward_runs(
    p2: TestClient, users: dict[str, str], original: transformers.PreTrainedModel, v1: Deployed
) -> None:
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))
    body = helpers.embeds(original, ids, v1.pi)
    before = tokens_processed(p2)
    message = helpers.assert_error(helpers.forward(p2, users["alice"], body, output="all"), 422, E_TOO_LARGE)
    assert f"{B}x{S}x{V} logits, {ALL_LOGITS} bytes" in message
    assert "output=last or output=topk" in message and "STIP_CLOUD_MAX_RESPONSE_BYTES" in message
    assert tokens_processed(p2) == before  # refused from the header: nothing ran
    tensors, _ = helpers.decoded(helpers.forward(p2, users["alice"], body, output="last"))
    assert tuple(tensors["logits"].shape) == (B, 1, V)
    helpers.decoded(helpers.forward(p2, users["alice"], body, output="topk", k=5))


@pytest.mark.parametrize("p2", [dict(max_response_bytes=ALL_LOGITS)], indirect=True)
def test_a_response_at_the_bound_is_served(
    p2: TestClient, users: dict[str, str], original: transformers.PreTrainedModel, v1: Deployed
) -> None:
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))
    tensors, _ = helpers.decoded(
        helpers.forward(p2, users["alice"], helpers.embeds(original, ids, v1.pi), output="all")
    )
    assert tuple(tensors["logits"].shape) == (B, S, V)
