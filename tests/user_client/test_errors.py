"""Key rotation, error codes mapped to exceptions, retries, settings from the environment."""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx
import pytest

from shared import api
from tests.user_client.conftest import CREDENTIAL, World
from user_client import StipClient, errors

IDS = [[101, 2023, 2003, 102]]


def test_key_outdated_refetches_and_retries(make_client: Callable[..., StipClient], world: World) -> None:
    client = make_client()
    before = client.forward(IDS)
    world.rotate("llama", 2)
    after = client.forward(IDS)  # 409 key_outdated -> refetch v2 -> retried transparently
    assert client.key_version == 2
    assert world.developer.fetches == 2
    assert float((before - after).abs().max()) <= 1e-4  # same model, new key
    versions = sorted(p.name for p in (world.cache_dir / "llama").iterdir())
    assert versions == ["v2"]  # the outdated key is removed from disk
    # a client started later picks v2 from the cache
    assert make_client().bundle.key_version == 2
    assert world.developer.fetches == 2


def test_key_outdated_when_p1_lags_past_the_wait(make_client: Callable[..., StipClient], world: World) -> None:
    client = make_client(rotation_wait_s=0.3)
    client.forward(IDS)
    world.rotate("llama", 2, p1=False)  # P2 switched, P1 still hands out v1 (and keeps doing so)
    with pytest.raises(errors.KeyOutdated, match="still hands it out after 0.3 s") as e:
        client.forward(IDS)
    assert e.value.code == api.E_KEY_OUTDATED
    with pytest.raises(errors.KeyOutdated):
        client.generate_ids(IDS[0], max_new_tokens=3)
    assert client.key_version == 1


def test_key_outdated_waits_for_p1_to_hand_out_the_new_key(
    make_client: Callable[..., StipClient], world: World
) -> None:
    """A rotation switches P2 before P1: the client polls P1 until it hands out the new key."""
    client = make_client(rotation_wait_s=60)
    expected = client.generate_ids(IDS[0], max_new_tokens=4, eos=False)
    world.rotate("llama", 2, p1=False)
    p1_catches_up = threading.Timer(0.5, lambda: world.rotate("llama", 2))
    p1_catches_up.start()
    try:
        before = world.developer.fetches
        assert client.generate_ids(IDS[0], max_new_tokens=4, eos=False) == expected  # no errors.KeyOutdated
    finally:
        p1_catches_up.join()
    assert client.key_version == 2
    assert world.developer.fetches - before >= 2  # asked P1 at least once while it still had v1


def test_session_opened_under_old_key(make_client: Callable[..., StipClient], world: World) -> None:
    client = make_client()
    session = client.open_session()
    client.forward(IDS, session=session)
    world.rotate("llama", 2)
    with pytest.raises(errors.KeyOutdated):  # the session's KV cache belongs to the old key
        client.forward(IDS, session=session)
    client.forward(IDS)
    with pytest.raises(errors.KeyOutdated, match="open a new session"):
        client.forward(IDS, session=session)
    with client.session() as fresh:
        assert fresh.key_version == 2
        client.forward(IDS, session=fresh)


def test_too_many_sessions(make_client: Callable[..., StipClient], world: World) -> None:
    world.cloud.max_sessions = 0
    with pytest.raises(errors.RateLimited) as e:
        make_client().generate_ids(IDS[0], max_new_tokens=2)
    assert e.value.status == 429 and e.value.code == api.E_TOO_MANY_SESSIONS


def test_wrong_credential(make_client: Callable[..., StipClient], world: World) -> None:
    with pytest.raises(errors.AuthError) as e:
        _ = make_client(credential="not-the-credential").bundle
    assert e.value.status == 401
    assert "not-the-credential" not in str(e.value)


def test_unknown_deployment(make_client: Callable[..., StipClient]) -> None:
    with pytest.raises(errors.NotFound):
        _ = make_client("nope").bundle


MAPPED: dict[type[errors.StipError], list[tuple[int, str]]] = {  # the SDK's exception for each (status, code)
    errors.AuthError: [(401, api.E_UNAUTHORIZED), (403, api.E_FORBIDDEN)],
    errors.NotFound: [(404, api.E_NOT_FOUND)],
    errors.KeyOutdated: [(409, api.E_KEY_OUTDATED)],
    errors.StipError: [(409, api.E_CONFLICT)],
    errors.SessionExpired: [(410, api.E_SESSION_EXPIRED)],
    errors.BadRequest: [(413, api.E_TOO_LARGE), (400, api.E_BAD_INPUT), (422, api.E_BAD_INPUT)],
    errors.RateLimited: [(429, api.E_TOO_MANY_SESSIONS)],
    errors.ServerError: [(500, api.E_INTERNAL), (503, api.E_NOT_READY)],
}


@pytest.mark.parametrize(
    ("status", "code", "exc"), [(status, code, exc) for exc, answers in MAPPED.items() for status, code in answers]
)
def test_error_codes_map_to_exceptions(
    status: int, code: str, exc: type[errors.StipError], make_client: Callable[..., StipClient]
) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        body = {"error": {"code": code, "message": "something went wrong"}}
        return httpx.Response(status, json=body, headers={"Retry-After": "0"})

    client = make_client(cloud_url="http://mock.test", cloud_transport=httpx.MockTransport(handler), retries=3)
    with pytest.raises(exc) as e:
        client.forward(IDS)
    assert type(e.value) is exc
    assert (e.value.status, e.value.code) == (status, code)
    assert "something went wrong" in e.value.message
    assert CREDENTIAL not in str(e.value)
    assert calls[0].headers["authorization"] == f"Bearer {CREDENTIAL}"
    # a stateless forward is idempotent: 5xx are retried (retries=3), 4xx are not; on
    # key_outdated the bundle is refetched, and as P1 still serves v1, nothing is resent
    expected_calls = {500: 4, 503: 4}.get(status, 1)
    assert len(calls) == expected_calls
    if exc is errors.RateLimited:
        assert e.value.retry_after == 0.0  # type: ignore[attr-defined]


def test_session_calls_are_not_resent(make_client: Callable[..., StipClient], world: World) -> None:
    client = make_client()
    with client.session() as s:
        world.cloud.fail_next = [(500, api.E_INTERNAL)]
        with pytest.raises(errors.ServerError):
            client.forward(IDS, session=s)
    assert len([f for f in world.cloud.forwards if f["session"]]) == 0


def test_connection_errors(make_client: Callable[..., StipClient]) -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    client = make_client(cloud_url="http://mock.test", cloud_transport=httpx.MockTransport(handler), retries=2)
    with pytest.raises(errors.TransportError, match="cannot connect to http://mock.test"):  # names the URL
        client.forward(IDS)
    assert len(calls) == 3


def test_malformed_response(make_client: Callable[..., StipClient]) -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=b"\x01\x02garbage"))
    client = make_client(cloud_url="http://mock.test", cloud_transport=transport)
    with pytest.raises(errors.StipError, match="malformed"):
        client.forward(IDS)


def test_settings_from_environment(
    monkeypatch: pytest.MonkeyPatch, world: World, make_client: Callable[..., StipClient]
) -> None:
    for name in ("DEVELOPER_URL", "DEPLOYMENT_ID", "DEPLOYMENT", "CREDENTIAL", "CLOUD_URL"):
        monkeypatch.delenv(f"STIP_CLIENT_{name}", raising=False)
    with pytest.raises(ValueError, match="developer_url"):
        StipClient(deployment_id="llama", credential="x")
    monkeypatch.setenv("STIP_CLIENT_DEVELOPER_URL", "http://developer.test")
    monkeypatch.setenv("STIP_CLIENT_DEPLOYMENT", "llama")
    monkeypatch.setenv("STIP_CLIENT_CREDENTIAL", CREDENTIAL)
    monkeypatch.setenv("STIP_CLIENT_CACHE_DIR", str(world.cache_dir))
    monkeypatch.setenv("STIP_CLIENT_VERIFY", "false")
    with StipClient(developer_transport=world.developer_transport, cloud_transport=world.cloud_transport) as client:
        assert client.deployment_id == "llama"
        assert client.bundle.path.parent.parent == world.cache_dir
        assert CREDENTIAL not in repr(client)
    monkeypatch.delenv("STIP_CLIENT_CREDENTIAL")
    with pytest.raises(ValueError, match="credential"):
        StipClient()


def test_open_session_after_rotation(make_client: Callable[..., StipClient], world: World) -> None:
    client = make_client()
    assert client.key_version == 1
    world.rotate("llama", 2)
    with client.session() as s:  # P2 opens it under v2: the client refetches and uses v2
        assert s.key_version == client.key_version == 2
        client.forward(IDS, session=s)
    assert world.cloud.sessions == {}
