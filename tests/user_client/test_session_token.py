"""The SDK authenticates its session steps with the session's token, and falls back to the
credential when P2 refuses the token (the session ended, or the credential did).

The fake P2 of `fakes.py` knows no session tokens: `TokenGate` stands in front of it, hands out
a token with each session and swaps an accepted token for the credential before passing the
step on (P2's own checks of the token: tests/cloud_service/test_session_tokens.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from shared import api
from tests.user_client.conftest import CREDENTIAL, World
from user_client import StipClient
from user_client.errors import AuthError, SessionExpired

PROMPT = [101, 2023, 2003, 1037, 3231]


class TokenGate(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.tokens: dict[str, str] = {}  # session id -> its token
        self.steps: list[str] = []  # the Authorization of every forward step, in order
        self.refuse = False  # refuse every session token (401), as P2 does for an ended session

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sid = request.url.params.get("session_id")
        if request.url.path.endswith("/forward") and sid is not None:
            auth = request.headers["Authorization"]
            self.steps.append(auth)
            if auth == f"Bearer {self.tokens.get(sid)}":
                if self.refuse:
                    body = {"error": {"code": api.E_UNAUTHORIZED, "message": "invalid session token"}}
                    return httpx.Response(401, json=body, headers={"WWW-Authenticate": "Bearer"})
                request.headers["Authorization"] = f"Bearer {CREDENTIAL}"
        response = self.inner.handle_request(request)
        if request.url.path.endswith("/sessions") and response.status_code == 201:
            created = json.loads(response.read())
            created["session_token"] = self.tokens[created["session_id"]] = f"token-of-{created['session_id']}"
            return httpx.Response(201, json=created)
        return response


@pytest.fixture
def gate(world: World) -> TokenGate:
    return TokenGate(world.cloud_transport)


def test_every_step_of_a_generation_sends_the_session_token(
    gate: TokenGate, make_client: Callable[..., StipClient]
) -> None:
    plain = make_client().generate_ids(PROMPT, max_new_tokens=6, eos=False)  # P2 without tokens
    with_tokens = make_client(cloud_transport=gate).generate_ids(PROMPT, max_new_tokens=6, eos=False)
    assert with_tokens == plain
    (token,) = gate.tokens.values()
    assert gate.steps == [f"Bearer {token}"] * 6  # the prompt, then one step per new token after the first
    assert CREDENTIAL not in token


def _lose_the_session(world: World) -> type[Exception]:
    world.cloud.sessions.clear()  # P2 lost the session: the credential hears that it expired
    return SessionExpired


def _revoke_the_credential(world: World) -> type[Exception]:
    world.cloud.credential = "another"  # the fake P2 no longer accepts the client's credential
    return AuthError


@pytest.mark.parametrize("lose", [_lose_the_session, _revoke_the_credential])
def test_a_refused_token_is_followed_by_one_step_with_the_credential(
    gate: TokenGate,
    make_client: Callable[..., StipClient],
    world: World,
    lose: Callable[[World], type[Exception]],
) -> None:
    client = make_client(cloud_transport=gate)
    with client.session() as session:
        client.forward([PROMPT], session=session)
        gate.refuse = True
        with pytest.raises(lose(world)):
            client.forward([[2023]], session=session)
    token = gate.tokens[session.session_id]
    assert gate.steps == [f"Bearer {token}", f"Bearer {token}", f"Bearer {CREDENTIAL}"]  # no more
