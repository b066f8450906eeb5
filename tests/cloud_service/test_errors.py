"""Credentials and bad input: a 4xx in the one error shape, and P2 keeps serving, state intact."""

import logging
import struct

import pytest
import torch
import transformers
from fastapi.testclient import TestClient

from shared import wire
from shared.api import (
    ATTENTION_MASK,
    E_BAD_INPUT,
    E_FORBIDDEN,
    E_NOT_FOUND,
    E_TOO_LARGE,
    E_UNAUTHORIZED,
    INPUTS_EMBEDS,
    LOGITS,
)
from shared.credentials import Signer
from shared.permutation import unpermute
from tests.cloud_service import helpers
from tests.cloud_service.helpers import DEPLOYMENT, PUSH_TOKEN, D, Deployed, V
from tests.support import max_abs_diff


def valid(client: TestClient, original: transformers.PreTrainedModel, v1: Deployed, credential: str) -> None:
    ids = torch.randint(0, V, (1, 4))
    tensors, _ = helpers.decoded(
        helpers.forward(client, credential, helpers.embeds(original, ids, v1.pi), output="last")
    )
    with torch.no_grad():
        ref = original(input_ids=ids).logits[:, -1:]
    assert max_abs_diff(unpermute(tensors[LOGITS], v1.pi_c), ref) <= 1e-4


def test_credentials_missing_forged_expired_or_for_another_deployment(
    deployed: TestClient, signer: Signer, credential: str, original: transformers.PreTrainedModel, v1: Deployed
) -> None:
    x = helpers.embeds(original, torch.randint(0, V, (1, 3)), v1.pi)
    sessions = f"/v1/deployments/{DEPLOYMENT}/sessions"
    forged, _ = Signer.generate().issue(subject="alice", deployment_id=DEPLOYMENT, ttl_s=3600)
    expired, _ = signer.issue(subject="alice", deployment_id=DEPLOYMENT, ttl_s=60, now=1_000_000)
    other, _ = signer.issue(subject="alice", deployment_id="another-deployment", ttl_s=3600)
    forged_other, _ = Signer.generate().issue(subject="alice", deployment_id="another-deployment", ttl_s=3600)
    payload, signature = credential.split(".")[1:]
    flipped = "B" if signature[10] == "A" else "A"  # a full 6-bit character: always another signature
    tampered = f"stip1.{payload}.{signature[:10]}{flipped}{signature[11:]}"
    cases = [
        (None, 401, E_UNAUTHORIZED),
        ("", 401, E_UNAUTHORIZED),
        ("garbage", 401, E_UNAUTHORIZED),
        (forged, 401, E_UNAUTHORIZED),
        (tampered, 401, E_UNAUTHORIZED),
        (expired, 401, E_UNAUTHORIZED),
        (forged_other, 401, E_UNAUTHORIZED),
        (PUSH_TOKEN, 401, E_UNAUTHORIZED),
        (other, 403, E_FORBIDDEN),
    ]
    for token, status, code in cases:
        response = helpers.forward(deployed, token, x)
        message = helpers.assert_error(response, status, code)
        if token:
            assert token not in message
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        helpers.assert_error(deployed.post(sessions, headers=headers), status, code)
    assert "expired" in helpers.assert_error(helpers.forward(deployed, expired, x), 401, E_UNAUTHORIZED)
    message = helpers.assert_error(helpers.forward(deployed, other, x), 403, E_FORBIDDEN)
    assert "another-deployment" in message and DEPLOYMENT in message  # the one it is for, and this one
    basic = deployed.post(sessions, headers={"Authorization": f"Basic {credential}"})
    helpers.assert_error(basic, 401, E_UNAUTHORIZED)
    assert basic.headers["www-authenticate"] == "Bearer"
    valid(deployed, original, v1, credential)


def test_sessions_belong_to_their_user(deployed: TestClient, signer: Signer, credential: str) -> None:
    bob, _ = signer.issue(subject="bob", deployment_id=DEPLOYMENT, ttl_s=3600)
    created = deployed.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers={"Authorization": f"Bearer {credential}"})
    session = created.json()["session_id"]
    x = {INPUTS_EMBEDS: torch.randn(1, 2, D)}
    helpers.assert_error(helpers.forward(deployed, bob, x, session_id=session), 403, E_FORBIDDEN)
    helpers.assert_error(
        deployed.delete(f"/v1/sessions/{session}", headers={"Authorization": f"Bearer {bob}"}), 403, E_FORBIDDEN
    )
    helpers.assert_error(deployed.delete(f"/v1/sessions/{session}"), 401, E_UNAUTHORIZED)
    helpers.assert_error(
        deployed.delete("/v1/sessions/nope", headers={"Authorization": f"Bearer {credential}"}), 404, E_NOT_FOUND
    )
    auth = {"Authorization": f"Bearer {credential}"}
    assert deployed.delete(f"/v1/sessions/{session}", headers=auth).status_code == 204
    helpers.assert_error(deployed.delete(f"/v1/sessions/{session}", headers=auth), 404, E_NOT_FOUND)
    helpers.assert_error(helpers.forward(deployed, credential, x, session_id=session), 404, E_NOT_FOUND)


def _safetensors_with_nan() -> bytes:
    x = torch.randn(1, 3, D)
    x[0, 1, 2] = float("nan")
    return wire.encode({INPUTS_EMBEDS: x})


BAD_BODIES: dict[str, tuple[object, dict[str, str | int], int, str, str]] = {
    # name: (tensors or raw body, query, status, code, a word the message must carry)
    "wrong d": ({INPUTS_EMBEDS: torch.randn(1, 3, D + 1)}, {}, 400, E_BAD_INPUT, "d="),
    "rank 2": ({INPUTS_EMBEDS: torch.randn(3, D)}, {}, 400, E_BAD_INPUT, "shape"),
    "rank 4": ({INPUTS_EMBEDS: torch.randn(1, 1, 3, D)}, {}, 400, E_BAD_INPUT, "shape"),
    "int dtype": ({INPUTS_EMBEDS: torch.randint(0, 5, (1, 3, D))}, {}, 400, E_BAD_INPUT, "I64"),
    "float64": ({INPUTS_EMBEDS: torch.randn(1, 3, D, dtype=torch.float64)}, {}, 400, E_BAD_INPUT, "F64"),
    "token ids": ({"input_ids": torch.randint(0, V, (1, 3))}, {}, 400, E_BAD_INPUT, "input_ids"),
    "a permutation": (
        {INPUTS_EMBEDS: torch.randn(1, 3, D), "pi": torch.arange(D)},
        {},
        400,
        E_BAD_INPUT,
        "unexpected",
    ),
    "empty seq": ({INPUTS_EMBEDS: torch.randn(1, 0, D)}, {}, 400, E_BAD_INPUT, "empty"),
    "NaN": (_safetensors_with_nan(), {}, 400, E_BAD_INPUT, "NaN"),
    "malformed": (b"\x00\x01not safetensors at all", {}, 400, E_BAD_INPUT, "not safetensors"),
    "bad json": (struct.pack("<Q", 9) + b"{not json", {}, 400, E_BAD_INPUT, "JSON"),
    "short": (b"\x01\x02", {}, 400, E_BAD_INPUT, "safetensors"),
    "huge header": (struct.pack("<Q", 1 << 40) + b"{}", {}, 400, E_BAD_INPUT, "header"),
    "truncated": (wire.encode({INPUTS_EMBEDS: torch.randn(1, 3, D)})[:-8], {}, 400, E_BAD_INPUT, "data region"),
    "empty body": (b"", {}, 400, E_BAD_INPUT, "safetensors"),
    "mask shape": (
        {INPUTS_EMBEDS: torch.randn(2, 3, D), ATTENTION_MASK: torch.ones(2, 4, dtype=torch.long)},
        {},
        400,
        E_BAD_INPUT,
        ATTENTION_MASK,
    ),
    "mask values": (
        {INPUTS_EMBEDS: torch.randn(1, 3, D), ATTENTION_MASK: torch.tensor([[1, 2, 1]])},
        {},
        400,
        E_BAD_INPUT,
        "0",
    ),
    "mask all zero": (
        {INPUTS_EMBEDS: torch.randn(1, 3, D), ATTENTION_MASK: torch.zeros(1, 3, dtype=torch.long)},
        {},
        400,
        E_BAD_INPUT,
        "row",
    ),
    "batch too large": ({INPUTS_EMBEDS: torch.randn(5, 1, D)}, {}, 400, E_BAD_INPUT, "batch"),
    "beyond positions": ({INPUTS_EMBEDS: torch.randn(1, 25, D)}, {}, 400, E_BAD_INPUT, "positions"),
    "topk without k": ({INPUTS_EMBEDS: torch.randn(1, 3, D)}, {"output": "topk"}, 400, E_BAD_INPUT, "k"),
    "k too large": ({INPUTS_EMBEDS: torch.randn(1, 3, D)}, {"output": "topk", "k": V + 1}, 400, E_BAD_INPUT, "k"),
    "k without topk": ({INPUTS_EMBEDS: torch.randn(1, 3, D)}, {"output": "all", "k": 3}, 400, E_BAD_INPUT, "k"),
    "k zero": ({INPUTS_EMBEDS: torch.randn(1, 3, D)}, {"output": "topk", "k": 0}, 422, E_BAD_INPUT, "k"),
    "unknown output": ({INPUTS_EMBEDS: torch.randn(1, 3, D)}, {"output": "probs"}, 422, E_BAD_INPUT, "output"),
    "bad key version": ({INPUTS_EMBEDS: torch.randn(1, 3, D)}, {}, 422, E_BAD_INPUT, "x-stip-key-version"),
    "over the limit": ({INPUTS_EMBEDS: torch.randn(1, 40, D)}, {}, 413, E_TOO_LARGE, "limit"),
}


@pytest.fixture
def strict(tmp_path, v1: Deployed, signer: Signer):  # type: ignore[no-untyped-def]
    """P2 with small limits: 4 rows, 4 KiB bodies."""
    with helpers.serving(tmp_path / "data", v1, signer, max_batch=4, max_body_bytes=4096) as client:
        yield client


def test_bad_input_is_refused_in_the_error_shape_and_p2_keeps_serving(
    strict: TestClient,
    credential: str,
    original: transformers.PreTrainedModel,
    v1: Deployed,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name, (payload, query, status, code, word) in BAD_BODIES.items():
        body = payload if isinstance(payload, bytes) else wire.encode(payload)  # type: ignore[arg-type]
        headers = {"Authorization": f"Bearer {credential}"}
        if name == "bad key version":
            headers["X-Stip-Key-Version"] = "one"
        response = strict.post(f"/v1/deployments/{DEPLOYMENT}/forward", content=body, headers=headers, params=query)
        message = helpers.assert_error(response, status, code)
        assert word.lower() in message.lower(), (name, message)
        valid(strict, original, v1, credential)
    assert credential not in caplog.text and PUSH_TOKEN not in caplog.text


def test_a_bad_step_does_not_harm_the_session(
    deployed: TestClient, credential: str, original: transformers.PreTrainedModel, v1: Deployed
) -> None:
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        ref = original(input_ids=ids).logits
    auth = {"Authorization": f"Bearer {credential}"}
    session = deployed.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers=auth).json()["session_id"]
    helpers.decoded(
        helpers.forward(deployed, credential, helpers.embeds(original, ids[:, :5], v1.pi), session_id=session)
    )
    wrong_batch = helpers.embeds(original, ids[:1, 5:], v1.pi)
    assert "rows" in helpers.assert_error(
        helpers.forward(deployed, credential, wrong_batch, session_id=session), 400, E_BAD_INPUT
    )
    too_long = {INPUTS_EMBEDS: torch.randn(2, 20, D)}  # 5 cached + 20 > 24 positions
    assert "positions" in helpers.assert_error(
        helpers.forward(deployed, credential, too_long, session_id=session), 400, E_BAD_INPUT
    )
    nan = torch.full((2, 1, D), float("inf"))
    helpers.assert_error(
        helpers.forward(deployed, credential, {INPUTS_EMBEDS: nan}, session_id=session), 400, E_BAD_INPUT
    )
    tensors, meta = helpers.decoded(
        helpers.forward(
            deployed, credential, helpers.embeds(original, ids[:, 5:], v1.pi), session_id=session, output="last"
        )
    )
    assert meta["session_length"] == "6"
    assert max_abs_diff(unpermute(tensors[LOGITS], v1.pi_c), ref[:, -1:]) <= 1e-4


def test_unknown_routes_methods_and_deployments_use_the_error_shape(deployed: TestClient, credential: str) -> None:
    helpers.assert_error(deployed.get("/v2/nothing"), 404, E_NOT_FOUND)
    response = deployed.get(f"/v1/deployments/{DEPLOYMENT}/forward")
    helpers.assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["allow"]
    x = {INPUTS_EMBEDS: torch.randn(1, 2, D)}
    helpers.assert_error(helpers.forward(deployed, credential, x, deployment_id="unknown"), 404, E_NOT_FOUND)
