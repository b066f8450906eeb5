"""P2 on the vLLM engine (STIP_CLOUD_ENGINE=vllm), a real process, against plaintext and the
transformers engine.

One P2 process for the module, so two vLLM server starts in all: key version 1 in token mode
(it also serves forward, so both modes run on one server), then a rotation to key version 2 in
embeds mode. The last test kills P2 with SIGKILL and checks that its engine goes with it.
Needs the vLLM environment (`make vllm-env`); without it every test fails saying so.
"""

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from shared import wire
from shared.api import E_BAD_INPUT, E_KEY_OUTDATED, PUSH_MODE, TOPK_INDICES, TOPK_VALUES
from shared.checkpoint import transform_model_dir
from shared.credentials import Signer
from shared.permutation import permute
from tests.cloud_service.helpers import (
    DEPLOYMENT,
    PUSH_TOKEN,
    Deployed,
    assert_error,
    decoded,
    embeds,
    forward,
    push,
    serve,
)
from tests.e2e.processes import CLOUD, free_port, start, stop, wait_for, wait_ready
from tests.support import assert_close, random_causal_lm
from tests.vllm.engine import CONFIG, engine_env, engine_groups, group_members, vllm_python

PROMPT = [5, 17, 3, 40, 22, 9, 58, 0, 11]
NEW = 12
START_S = 600  # a vLLM server's start on a loaded 2-core machine


@pytest.fixture(scope="module")
def python() -> Path:
    return vllm_python()


@pytest.fixture(scope="module")
def original() -> transformers.PreTrainedModel:
    return random_causal_lm(CONFIG, seed=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, original: transformers.PreTrainedModel) -> Path:
    path = tmp_path_factory.mktemp("llama")
    original.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def token_v1(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Deployed:
    out = tmp_path_factory.mktemp("v1") / "out"
    return Deployed(transform_model_dir(model_dir, out, key_version=1, progress=False, mode="token"), 1)


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Deployed:
    out = tmp_path_factory.mktemp("v2") / "out"
    return Deployed(transform_model_dir(model_dir, out, key_version=2, progress=False), 2)


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture(scope="module")
def credential(signer: Signer) -> str:
    token, _ = signer.issue(subject="alice", deployment_id=DEPLOYMENT, ttl_s=3600)
    return token


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("p2-vllm") / "data"


@pytest.fixture(scope="module")
def p2(python: Path, data_dir: Path) -> Iterator[tuple[subprocess.Popen, httpx.Client]]:
    """P2 on the vLLM engine, a separate process, no deployment yet."""
    port = free_port()
    env = engine_env(python, data_dir) | {"STIP_CLOUD_PUSH_TOKEN": PUSH_TOKEN, "STIP_CLOUD_LOG_LEVEL": "INFO"}
    log = data_dir.parent / "p2.log"
    proc = start(CLOUD, env, log, host="127.0.0.1", port=port, data_dir=data_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=60)
        with httpx.Client(base_url=url, timeout=START_S) as client:
            yield proc, client
    finally:
        groups = engine_groups(data_dir)
        stop(proc)
        wait_for(lambda: not group_members(groups), 60, "the engine processes to end with P2")


@pytest.fixture(scope="module")
def served(p2: tuple[subprocess.Popen, httpx.Client], token_v1: Deployed, signer: Signer) -> httpx.Client:
    """Key version 1, token mode, pushed (its vLLM server started)."""
    _, client = p2
    body, digest = token_v1.body(signer, **{PUSH_MODE: "token"})
    reply = push(client, body, digest)  # type: ignore[arg-type]
    assert reply.status_code == 200, reply.text
    return client


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, token_v1: Deployed, signer: Signer) -> Iterator[TestClient]:
    """The same θ′ on the transformers engine (in process)."""
    with serve(tmp_path_factory.mktemp("p2-tf") / "data") as client:
        body, digest = token_v1.body(signer, **{PUSH_MODE: "token"})
        assert push(client, body, digest).status_code == 200
        yield client


def plaintext_last(original: transformers.PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor | None = None):
    with torch.no_grad():
        return original(input_ids=ids, attention_mask=mask).logits[:, -1:]  # (B, 1, V)


def relabel(ids: list[int], pi_c: torch.Tensor) -> list[int]:
    return torch.argsort(pi_c)[torch.tensor(ids)].tolist()


# --- a bad θ′ is refused before any engine sees it ---------------------------------------------


def without(deployed: Deployed, tmp: Path, drop: str | None = None, fill: str | None = None) -> list[Path]:
    """The cloud shards with one tensor dropped, or one tensor filled with ones."""
    tmp.mkdir()
    files = []
    for i, path in enumerate(deployed.result.cloud_files):
        tensors = load_file(str(path))
        if drop is not None:
            tensors.pop(drop, None)
        if fill is not None and fill in tensors:
            tensors[fill] = torch.ones_like(tensors[fill])
        out = tmp / f"shard-{i}.safetensors"
        save_file(tensors, str(out))
        files.append(out)
    return files


def test_a_bad_theta_is_refused_before_the_engine_loads_it(
    p2: tuple[subprocess.Popen, httpx.Client], v2: Deployed, signer: Signer, data_dir: Path, tmp_path: Path
) -> None:
    _, client = p2
    drop = "model.layers.1.mlp.down_proj.weight"
    cases = [
        (without(v2, tmp_path / "a", drop=drop), {}, drop),
        (without(v2, tmp_path / "b", drop="model.norm.weight"), {}, "model.norm.weight"),
    ]
    for files, meta, expected in cases:
        body, digest = _body(v2, signer, files, meta)
        message = assert_error(push(client, body, digest), 400, E_BAD_INPUT)  # type: ignore[arg-type]
        assert expected in message and "missing" in message
    # embeds mode with a non-zero token table (a table of ones)
    files = _with_table(v2, tmp_path / "c")
    body, digest = _body(v2, signer, files, {})
    assert "never accepts the embedding module" in assert_error(push(client, body, digest), 400, E_BAD_INPUT)  # type: ignore[arg-type]
    assert engine_groups(data_dir) == set()  # no engine was ever started for them
    assert client.get(f"/v1/deployments/{DEPLOYMENT}").status_code == 404


def _with_table(deployed: Deployed, tmp: Path) -> list[Path]:
    tmp.mkdir()
    table = tmp / "table.safetensors"
    save_file({"model.embed_tokens.weight": torch.ones(CONFIG["vocab_size"], CONFIG["hidden_size"])}, str(table))
    return [*deployed.result.cloud_files, table]


def _body(deployed: Deployed, signer: Signer, files: list[Path], meta: dict[str, str]) -> tuple[bytes, str]:
    import hashlib

    from shared.api import PUSH_CONFIG, PUSH_DEPLOYMENT, PUSH_FAMILY, PUSH_KEY_VERSION, PUSH_VERIFY_KEY

    config = json.loads((deployed.result.out_dir / "cloud" / "config.json").read_text())
    metadata = {
        PUSH_DEPLOYMENT: DEPLOYMENT,
        PUSH_FAMILY: deployed.result.family,
        PUSH_CONFIG: json.dumps(config),
        PUSH_KEY_VERSION: str(deployed.key_version),
        PUSH_VERIFY_KEY: signer.public_key,
    } | meta
    _, chunks = wire.concat_files(files, metadata)
    body = b"".join(chunks)
    return body, hashlib.sha256(body).hexdigest()


# --- embeds mode ----------------------------------------------------------------------------------


def test_forward_equals_plaintext_and_the_transformers_engine(
    served: httpx.Client,
    reference: TestClient,
    original: transformers.PreTrainedModel,
    token_v1: Deployed,
    credential: str,
) -> None:
    pi_c = token_v1.pi_c
    ids = torch.tensor([PROMPT, [0, 0, 0, *PROMPT[3:]]])
    mask = torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6])  # row 1 left-padded
    tensors = embeds(original, ids, token_v1.pi) | {"attention_mask": mask}
    got, meta = decoded(forward(served, credential, tensors, output="last"))  # type: ignore[arg-type]
    ref, _ = decoded(forward(reference, credential, tensors, output="last"))
    plain = permute(plaintext_last(original, ids, mask), pi_c)  # (2, 1, V) permuted by π_c
    assert_close(plain, got["logits"])
    assert_close(ref["logits"], got["logits"])
    top, _ = decoded(forward(served, credential, tensors, output="topk", k=5))  # type: ignore[arg-type]
    values, indices = torch.topk(plain, 5, dim=-1)
    assert torch.equal(top[TOPK_INDICES], indices)
    assert_close(values, top[TOPK_VALUES])


def test_a_session_resubmits_its_prefix(
    served: httpx.Client, original: transformers.PreTrainedModel, token_v1: Deployed, credential: str
) -> None:
    auth = {"Authorization": f"Bearer {credential}"}
    session = served.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers=auth).json()["session_id"]
    ids = torch.tensor([PROMPT])
    steps = [ids[:, :5], ids[:, 5:6], ids[:, 6:7], ids[:, 7:]]
    for n, part in enumerate(steps):
        out, meta = decoded(
            forward(served, credential, embeds(original, part, token_v1.pi), session_id=session, output="last")  # type: ignore[arg-type]
        )
        seen = torch.cat(steps[: n + 1], dim=1)
        assert_close(permute(plaintext_last(original, seen), token_v1.pi_c), out["logits"])
        assert int(meta["session_length"]) == seen.shape[1]
    assert served.delete(f"/v1/sessions/{session}", headers=auth).status_code == 204


def test_output_all_is_refused_saying_why(
    served: httpx.Client, original: transformers.PreTrainedModel, token_v1: Deployed, credential: str
) -> None:
    tensors = embeds(original, torch.tensor([PROMPT]), token_v1.pi)
    message = assert_error(forward(served, credential, tensors, output="all"), 400, E_BAD_INPUT)  # type: ignore[arg-type]
    assert "last position only" in message and "STIP_CLOUD_ENGINE=transformers" in message


# --- token mode ----------------------------------------------------------------------------------


def generate(client: httpx.Client | TestClient, credential: str, body: dict) -> httpx.Response:
    return client.post(
        f"/v1/deployments/{DEPLOYMENT}/generate", json=body, headers={"Authorization": f"Bearer {credential}"}
    )


def streamed_ids(reply: httpx.Response) -> tuple[list[int], dict]:
    ids, done = [], {}
    for block in reply.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        data = json.loads(lines["data"])
        if lines["event"] == "ids":
            ids += data["ids"]
        else:
            assert lines["event"] == "done", data
            done = data
    return ids, done


def test_greedy_generation_equals_plaintext_generate(
    served: httpx.Client,
    reference: TestClient,
    original: transformers.PreTrainedModel,
    token_v1: Deployed,
    credential: str,
) -> None:
    pi_c = token_v1.pi_c
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        plain = original.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False, eos_token_id=None
        )[0, len(PROMPT) :].tolist()
    request = {"input_ids": relabel(PROMPT, pi_c), "max_tokens": NEW}
    reply = generate(served, credential, request)
    assert reply.status_code == 200, reply.text
    got = reply.json()
    assert pi_c[torch.tensor(got["ids"])].tolist() == plain
    assert got["finish_reason"] == "length" and got["generated_tokens"] == NEW
    assert got["ids"] == generate(reference, credential, request).json()["ids"]  # the transformers engine's
    ids, done = streamed_ids(generate(served, credential, request | {"stream": True}))
    assert ids == got["ids"] and done["ids"] == got["ids"]
    stop_at = got["ids"][4]  # a relabelled stop id ends the generation there
    stopped = generate(served, credential, request | {"stop_ids": [stop_at]}).json()
    assert stopped["ids"] == got["ids"][: got["ids"].index(stop_at) + 1] and stopped["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(served: httpx.Client, token_v1: Deployed, credential: str) -> None:
    request = {"input_ids": relabel(PROMPT, token_v1.pi_c), "max_tokens": NEW, "temperature": 1.0, "top_k": 20}
    runs = [generate(served, credential, request | {"seed": seed}).json()["ids"] for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and len(runs[0]) == NEW
    assert runs[0] != runs[2]  # 12 draws over a 61-token vocabulary: equal by chance is vanishingly rare
    assert all(0 <= j < CONFIG["vocab_size"] for j in runs[2])


# --- rotation and process ends -----------------------------------------------------------------


def test_a_rotated_version_serves_only_once_its_engine_does(
    served: httpx.Client,
    original: transformers.PreTrainedModel,
    token_v1: Deployed,
    v2: Deployed,
    signer: Signer,
    credential: str,
    data_dir: Path,
) -> None:
    old_engines = engine_groups(data_dir)
    assert len(old_engines) == 1
    body, digest = v2.body(signer)
    result: dict[str, httpx.Response] = {}
    pusher = threading.Thread(target=lambda: result.setdefault("push", push(served, body, digest)))  # type: ignore[arg-type]
    tensors_v1 = embeds(original, torch.tensor([PROMPT]), token_v1.pi)
    plain = plaintext_last(original, torch.tensor([PROMPT]))
    served_v1 = 0
    pusher.start()
    while pusher.is_alive():  # the old version serves while the new engine starts
        reply = forward(served, credential, tensors_v1, key_version=1, output="last")  # type: ignore[arg-type]
        if reply.status_code == 200 and pusher.is_alive():
            assert_close(permute(plain, token_v1.pi_c), decoded(reply)[0]["logits"])
            served_v1 += 1
        time.sleep(1.0)
    pusher.join()
    assert result["push"].status_code == 200, result["push"].text
    assert served_v1 >= 1
    stale = forward(served, credential, tensors_v1, key_version=1, output="last")  # type: ignore[arg-type]
    assert_error(stale, 409, E_KEY_OUTDATED)
    out, _ = decoded(forward(served, credential, embeds(original, torch.tensor([PROMPT]), v2.pi), output="last"))  # type: ignore[arg-type]
    assert_close(permute(plain, v2.pi_c), out["logits"])  # embeds mode on v2 (P2 wrote its zero token table)
    wait_for(lambda: not group_members(old_engines), 60, "the old version's engine to end")
    assert len(engine_groups(data_dir)) == 1
    info = served.get(f"/v1/deployments/{DEPLOYMENT}").json()
    assert info["key_version"] == 2 and info["mode"] == "embeds"


def test_the_engine_ends_when_p2_is_killed(p2: tuple[subprocess.Popen, httpx.Client], data_dir: Path) -> None:
    proc, _ = p2
    groups = engine_groups(data_dir)
    assert len(groups) == 1 and len(group_members(groups)) >= 3  # v2's watchdog, server and engine core
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    wait_for(lambda: not group_members(groups), 60, "the engine processes to end after P2's SIGKILL")
