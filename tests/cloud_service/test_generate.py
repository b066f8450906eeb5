"""Token mode on P2: the push that carries E′, the public facts, and POST .../generate.

P2 accepts the embedding tables only in a push whose metadata says token mode; it then runs the
stock `generate()` on ids relabelled by π_c, and the ids it returns, mapped through π_c, are the
plaintext model's own greedy tokens. Sampling with a seed is reproducible.
"""

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from fastapi.testclient import TestClient

from cloud_service import generation
from shared.api import (
    E_BAD_INPUT,
    E_KEY_OUTDATED,
    E_UNAUTHORIZED,
    KEY_VERSION_HEADER,
    PUSH_MODE,
    DeploymentInfo,
    GenerateRequest,
    GenerateResult,
)
from shared.checkpoint import transform_model_dir
from shared.credentials import Signer
from tests.cloud_service.helpers import DEPLOYMENT, Deployed, Reply, V, assert_error, push, serve

PROMPT = [5, 17, 3, 40, 22, 9, 58, 0, 11]  # id 0 included: a relabelled 0 must not count as padding
NEW = 12


@pytest.fixture(scope="module")
def token_v1(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Deployed:
    out = tmp_path_factory.mktemp("token") / "out"
    return Deployed(transform_model_dir(model_dir, out, key_version=1, progress=False, mode="token"), 1)


@pytest.fixture(scope="module")
def token_p2(tmp_path_factory: pytest.TempPathFactory, token_v1: Deployed, signer: Signer) -> Iterator[TestClient]:
    """A P2 serving the tiny Llama in token mode."""
    with serve(tmp_path_factory.mktemp("token-p2") / "data") as client:
        body, digest = token_v1.body(signer, **{PUSH_MODE: "token"})
        assert push(client, body, digest).status_code == 200
        yield client


def generate(client: TestClient, credential: str | None, body: object, **headers: str) -> Reply:
    if credential is not None:
        headers["Authorization"] = f"Bearer {credential}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(f"/v1/deployments/{DEPLOYMENT}/generate", content=content, headers=headers)


def relabel(ids: list[int], pi_c: torch.Tensor) -> list[int]:
    return torch.argsort(pi_c)[torch.tensor(ids)].tolist()


def events(reply: Reply) -> list[tuple[str, dict]]:
    out = []
    for block in reply.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_an_embeds_mode_push_never_carries_the_token_table(tmp_path: Path, token_v1: Deployed, signer: Signer) -> None:
    with serve(tmp_path / "data") as client:
        body, digest = token_v1.body(signer)  # E′ inside, but the metadata does not say token mode
        message = assert_error(push(client, body, digest), 400, E_BAD_INPUT)
        assert "never accepts the embedding module" in message and "embed_tokens" in message
        body, digest = token_v1.body(signer, **{PUSH_MODE: "tokens"})
        assert "must be 'embeds' or 'token'" in assert_error(push(client, body, digest), 400, E_BAD_INPUT)
        assert client.get(f"/v1/deployments/{DEPLOYMENT}").status_code == 404


def test_a_token_mode_push_must_carry_the_table(tmp_path: Path, v1: Deployed, signer: Signer) -> None:
    with serve(tmp_path / "data") as client:
        body, digest = v1.body(signer, **{PUSH_MODE: "token"})  # an embeds-mode θ′ marked token mode
        message = assert_error(push(client, body, digest), 400, E_BAD_INPUT)
        assert "must carry the permuted tables ['model.embed_tokens.weight']" in message


def test_public_facts_say_the_mode(token_p2: TestClient, deployed: TestClient) -> None:
    info = DeploymentInfo.model_validate(token_p2.get(f"/v1/deployments/{DEPLOYMENT}").json())
    assert info.mode == "token"
    assert deployed.get(f"/v1/deployments/{DEPLOYMENT}").json()["mode"] == "embeds"


def test_greedy_generation_equals_plaintext_generate(
    token_p2: TestClient, token_v1: Deployed, original: transformers.PreTrainedModel, credential: str
) -> None:
    pi_c = token_v1.pi_c
    reply = generate(token_p2, credential, {"input_ids": relabel(PROMPT, pi_c), "max_tokens": NEW})
    assert reply.status_code == 200, reply.text
    result = GenerateResult.model_validate(reply.json())
    with torch.no_grad():
        prompt = torch.tensor([PROMPT])
        ref = original.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False, eos_token_id=None
        )[0, len(PROMPT) :].tolist()
    assert pi_c[torch.tensor(result.ids)].tolist() == ref
    assert result.ids != ref and len(set(ref)) > 3  # relabelled on the wire; a real continuation
    assert (result.finish_reason, result.prompt_tokens, result.generated_tokens) == ("length", len(PROMPT), NEW)
    assert reply.headers[KEY_VERSION_HEADER] == "1"

    # the same as server-sent events, one relabelled id per event, then `done`
    streamed = generate(token_p2, credential, {"input_ids": relabel(PROMPT, pi_c), "max_tokens": NEW, "stream": True})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    got = events(streamed)
    assert [e for e, _ in got] == ["ids"] * NEW + ["done"]
    assert [d["ids"][0] for _, d in got[:-1]] == result.ids
    assert GenerateResult.model_validate(got[-1][1]) == result

    # a stop id ends it, included, with finish_reason stop
    stop = result.ids[4]
    stopped = GenerateResult.model_validate(
        generate(
            token_p2, credential, {"input_ids": relabel(PROMPT, pi_c), "max_tokens": NEW, "stop_ids": [stop]}
        ).json()
    )
    assert stopped.ids == result.ids[: result.ids.index(stop) + 1] and stopped.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(token_p2: TestClient, token_v1: Deployed, credential: str) -> None:
    request = {"input_ids": relabel(PROMPT, token_v1.pi_c), "max_tokens": 14, "temperature": 1.5, "top_k": 40}
    runs = [generate(token_p2, credential, dict(request, seed=seed)).json()["ids"] for seed in (7, 7, 8)]
    streamed = [d["ids"][0] for e, d in events(generate(token_p2, credential, dict(request, seed=7, stream=True)))[:-1]]
    assert runs[0] == runs[1] == streamed
    assert runs[0] != runs[2]  # another seed, another draw (14 tokens from 40: equal by chance ~never)


def test_generate_refusals(token_p2: TestClient, deployed: TestClient, credential: str) -> None:
    ok = {"input_ids": [1, 2, 3], "max_tokens": 4}
    # the credential is checked before the body is read: a garbage body without one is a 401
    assert_error(generate(token_p2, None, b"\xff not json"), 401, E_UNAUTHORIZED)
    assert_error(generate(token_p2, "not-a-credential", ok), 401, E_UNAUTHORIZED)
    assert "serves embeds mode only" in assert_error(generate(deployed, credential, ok), 400, E_BAD_INPUT)
    cases = {
        "invalid generate request": b"\xff not json",
        "input_ids": {"max_tokens": 4},
        "logits: Extra inputs": dict(ok, logits=True),
        f"ids must lie in 0..{V - 1}": dict(ok, input_ids=[1, V]),
        "exceeds the limit": dict(ok, max_tokens=10**6),
        "positions": dict(ok, max_tokens=23),  # 3 + 23 > the config's 24 positions
        "top_p": dict(ok, top_p=0.0),
    }
    for expected, body in cases.items():
        assert expected in assert_error(generate(token_p2, credential, body), 400, E_BAD_INPUT)
    outdated = generate(token_p2, credential, ok, **{KEY_VERSION_HEADER: "2"})
    assert "key version 2" in assert_error(outdated, 409, E_KEY_OUTDATED)
    assert generate(token_p2, credential, ok).status_code == 200  # and it still serves


def test_a_gone_client_stops_the_generation(token_p2: TestClient, token_v1: Deployed) -> None:
    """A streaming client that goes away sets the event: generate() stops within a step, not at max_tokens."""
    service = token_p2.app.state.service  # type: ignore[attr-defined]
    dep = service.deployment(DEPLOYMENT)
    request = GenerateRequest(input_ids=relabel(PROMPT, token_v1.pi_c), max_tokens=NEW)
    seen: list[int] = []
    gone = threading.Event()

    def on_token(j: int) -> None:
        seen.append(j)
        gone.set()  # the response is gone after the first id

    result = generation.run(service, dep, request, on_token=on_token, cancelled=gone)
    assert result.ids == seen and result.generated_tokens <= 2 < NEW


def test_token_mode_survives_a_restart(tmp_path: Path, token_v1: Deployed, signer: Signer, credential: str) -> None:
    request = {"input_ids": relabel(PROMPT, token_v1.pi_c), "max_tokens": 6}
    with serve(tmp_path / "data") as client:
        body, digest = token_v1.body(signer, **{PUSH_MODE: "token"})
        assert push(client, body, digest).status_code == 200
        before = generate(client, credential, request).json()["ids"]
    with serve(tmp_path / "data") as client:  # reloaded from disk, the mode from the push's metadata
        assert client.get(f"/v1/deployments/{DEPLOYMENT}").json()["mode"] == "token"
        assert generate(client, credential, request).json()["ids"] == before
