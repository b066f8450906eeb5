"""P2 on the vLLM engine (STIP_CLOUD_ENGINE=vllm), a real process, against plaintext and the
transformers engine.

One P2 process for the module, so two vLLM server starts in all: key version 1 in token mode
(it also serves forward, so both modes run on one server: `output=last`, `topk` and `all`), then
a rotation to key version 2 in embeds mode. The last test kills P2 with SIGKILL and checks that its engine goes with it.
Needs the vLLM environment (`make vllm-env`); without it every test fails saying so.
"""

import dataclasses
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from shared.api import E_BAD_INPUT, E_KEY_OUTDATED, PUSH_MODE, TOPK_INDICES, TOPK_VALUES
from shared.checkpoint import transform_model_dir
from shared.credentials import Signer
from shared.permutation import permute
from tests.cloud_service import helpers
from tests.cloud_service.helpers import DEPLOYMENT, Deployed, assert_error, decoded, forward, push
from tests.e2e.processes import CLOUD, free_port, start, stop, wait_for, wait_ready
from tests.support import assert_close, random_causal_lm
from tests.vllm.engine import engine_env, engine_groups, group_members, vllm_python
from tests.vllm.models import CONFIG

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
def versions(tmp_path_factory: pytest.TempPathFactory, original: transformers.PreTrainedModel) -> dict[int, Deployed]:
    """θ′ of `original` under key version 1 in token mode and key version 2 in embeds mode."""
    root = tmp_path_factory.mktemp("llama")
    original.save_pretrained(root / "model")
    return {
        v: Deployed(transform_model_dir(root / "model", root / f"v{v}", key_version=v, progress=False, mode=mode), v)
        for v, mode in ((1, "token"), (2, "embeds"))
    }


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("p2-vllm") / "data"


@pytest.fixture(scope="module")
def p2(python: Path, data_dir: Path) -> Iterator[tuple[subprocess.Popen, httpx.Client]]:
    """P2 on the vLLM engine, a separate process, no deployment yet."""
    port = free_port()
    env = engine_env(python, data_dir) | {"STIP_CLOUD_PUSH_TOKEN": helpers.PUSH_TOKEN, "STIP_CLOUD_LOG_LEVEL": "INFO"}
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


@dataclass
class Engines:
    """Key version 1 (token mode) of `original` pushed to P2 on the vLLM engine (`served`, its
    server started) and to an in-process P2 on the transformers engine (`reference`)."""

    served: httpx.Client
    reference: TestClient
    original: transformers.PreTrainedModel
    v1: Deployed
    credential: str

    def embeds(self, ids: torch.Tensor, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        return helpers.embeds(self.original, ids, self.v1.pi) | tensors


@pytest.fixture(scope="module")
def engines(
    p2: tuple[subprocess.Popen, httpx.Client],
    versions: dict[int, Deployed],
    original: transformers.PreTrainedModel,
    signer: Signer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Engines]:
    _, client = p2
    body, digest = versions[1].body(signer, **{PUSH_MODE: "token"})
    reply = push(client, body, digest)  # type: ignore[arg-type]
    assert reply.status_code == 200, reply.text
    credential, _ = signer.issue(subject="alice", deployment_id=DEPLOYMENT, ttl_s=3600)
    with helpers.serve(tmp_path_factory.mktemp("p2-tf") / "data") as reference:
        assert push(reference, body, digest).status_code == 200
        yield Engines(client, reference, original, versions[1], credential)


def plaintext_last(original: transformers.PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor | None = None):
    with torch.no_grad():
        return original(input_ids=ids, attention_mask=mask).logits[:, -1:]  # (B, 1, V)


def relabel(ids: list[int], pi_c: torch.Tensor) -> list[int]:
    return torch.argsort(pi_c)[torch.tensor(ids)].tolist()


# --- a bad θ′ is refused before any engine sees it ---------------------------------------------


def without(deployed: Deployed, tmp: Path, drop: str) -> list[Path]:
    """The cloud shards with one tensor dropped."""
    tmp.mkdir()
    files = []
    for i, path in enumerate(deployed.result.cloud_files):
        tensors = load_file(str(path))
        tensors.pop(drop, None)
        out = tmp / f"shard-{i}.safetensors"
        save_file(tensors, str(out))
        files.append(out)
    return files


def test_a_bad_theta_is_refused_before_the_engine_loads_it(
    p2: tuple[subprocess.Popen, httpx.Client],
    versions: dict[int, Deployed],
    signer: Signer,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    _, client = p2
    v2 = versions[2]
    drop = "model.layers.1.mlp.down_proj.weight"
    for files, missing in (
        (without(v2, tmp_path / "a", drop=drop), drop),
        (without(v2, tmp_path / "b", drop="model.norm.weight"), "model.norm.weight"),
    ):
        body, digest = _body(v2, signer, files)
        message = assert_error(push(client, body, digest), 400, E_BAD_INPUT)  # type: ignore[arg-type]
        assert missing in message and "missing" in message
    # embeds mode with a non-zero token table (a table of ones)
    body, digest = _body(v2, signer, _with_table(v2, tmp_path / "c"))
    assert "never accepts the embedding module" in assert_error(push(client, body, digest), 400, E_BAD_INPUT)  # type: ignore[arg-type]
    assert engine_groups(data_dir) == set()  # no engine was ever started for them
    assert client.get(f"/v1/deployments/{DEPLOYMENT}").status_code == 404


def _with_table(deployed: Deployed, tmp: Path) -> list[Path]:
    tmp.mkdir()
    table = tmp / "table.safetensors"
    save_file({"model.embed_tokens.weight": torch.ones(CONFIG["vocab_size"], CONFIG["hidden_size"])}, str(table))
    return [*deployed.result.cloud_files, table]


def _body(deployed: Deployed, signer: Signer, files: list[Path]) -> tuple[bytes, str]:
    """The push body of `deployed` with `files` in place of its cloud shards."""
    return Deployed(dataclasses.replace(deployed.result, cloud_files=files), deployed.key_version).body(signer)


# --- embeds mode ----------------------------------------------------------------------------------


def test_forward_equals_plaintext_and_the_transformers_engine(engines: Engines) -> None:
    e = engines
    ids = torch.tensor([PROMPT, [0, 0, 0, *PROMPT[3:]]])
    mask = torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6])  # row 1 left-padded
    tensors = e.embeds(ids, attention_mask=mask)
    got, _ = decoded(forward(e.served, e.credential, tensors, output="last"))  # type: ignore[arg-type]
    ref, _ = decoded(forward(e.reference, e.credential, tensors, output="last"))
    plain = permute(plaintext_last(e.original, ids, mask), e.v1.pi_c)  # (2, 1, V) permuted by π_c
    assert_close(plain, got["logits"])
    assert_close(ref["logits"], got["logits"])
    top, _ = decoded(forward(e.served, e.credential, tensors, output="topk", k=5))  # type: ignore[arg-type]
    values, indices = torch.topk(plain, 5, dim=-1)
    assert torch.equal(top[TOPK_INDICES], indices)
    assert_close(values, top[TOPK_VALUES])


def open_session(e: Engines) -> str:
    auth = {"Authorization": f"Bearer {e.credential}"}
    return str(e.served.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers=auth).json()["session_id"])


def test_a_session_resubmits_its_prefix(engines: Engines) -> None:
    e = engines
    session = open_session(e)
    ids = torch.tensor([PROMPT])
    steps = [ids[:, :5], ids[:, 5:6], ids[:, 6:7], ids[:, 7:]]
    for n, part in enumerate(steps):
        out, meta = decoded(forward(e.served, e.credential, e.embeds(part), session_id=session, output="last"))  # type: ignore[arg-type]
        seen = torch.cat(steps[: n + 1], dim=1)
        assert_close(permute(plaintext_last(e.original, seen), e.v1.pi_c), out["logits"])
        assert int(meta["session_length"]) == seen.shape[1]
    auth = {"Authorization": f"Bearer {e.credential}"}
    assert e.served.delete(f"/v1/sessions/{session}", headers=auth).status_code == 204


def test_output_all_equals_plaintext_and_the_transformers_engine(engines: Engines) -> None:
    """One prompt per position on the engine: a left-padded batch, then a session of two steps."""
    e = engines
    ids = torch.tensor([PROMPT, [0, 0, 0, *PROMPT[3:]]])
    mask = torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6])
    tensors = e.embeds(ids, attention_mask=mask)
    got = decoded(forward(e.served, e.credential, tensors, output="all"))[0]["logits"]  # type: ignore[arg-type]
    ref = decoded(forward(e.reference, e.credential, tensors, output="all"))[0]["logits"]
    with torch.no_grad():
        plain = permute(e.original(input_ids=ids, attention_mask=mask).logits, e.v1.pi_c)  # (2, 9, V)
    real = mask.bool()
    assert got.shape == plain.shape
    assert_close(plain[real], got[real])
    assert_close(ref[real], got[real])
    assert torch.equal(got[~real], torch.zeros_like(got[~real]))  # padding before a row's first token
    session = open_session(e)
    outs = [
        decoded(forward(e.served, e.credential, e.embeds(part), session_id=session, output="all"))[0]["logits"]  # type: ignore[arg-type]
        for part in (ids[:1, :5], ids[:1, 5:])
    ]
    assert_close(plain[:1], torch.cat(outs, dim=1))


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


def test_greedy_generation_equals_plaintext_generate(engines: Engines) -> None:
    e = engines
    pi_c = e.v1.pi_c
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        plain = e.original.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False, eos_token_id=None
        )[0, len(PROMPT) :].tolist()
    request = {"input_ids": relabel(PROMPT, pi_c), "max_tokens": NEW}
    reply = generate(e.served, e.credential, request)
    assert reply.status_code == 200, reply.text
    got = reply.json()
    assert pi_c[torch.tensor(got["ids"])].tolist() == plain
    assert got["finish_reason"] == "length" and got["generated_tokens"] == NEW
    assert got["ids"] == generate(e.reference, e.credential, request).json()["ids"]  # the transformers engine's
    ids, done = streamed_ids(generate(e.served, e.credential, request | {"stream": True}))
    assert ids == got["ids"] and done["ids"] == got["ids"]
    stop_at = got["ids"][4]  # a relabelled stop id ends the generation there
    stopped = generate(e.served, e.credential, request | {"stop_ids": [stop_at]}).json()
    assert stopped["ids"] == got["ids"][: got["ids"].index(stop_at) + 1] and stopped["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(engines: Engines) -> None:
    e = engines
    request = {"input_ids": relabel(PROMPT, e.v1.pi_c), "max_tokens": NEW, "temperature": 1.0, "top_k": 20}
    runs = [generate(e.served, e.credential, request | {"seed": seed}).json()["ids"] for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and len(runs[0]) == NEW
    assert runs[0] != runs[2]  # 12 draws over a 61-token vocabulary: equal by chance is vanishingly rare
    assert all(0 <= j < CONFIG["vocab_size"] for j in runs[2])


# --- rotation and process ends -----------------------------------------------------------------


def test_a_rotated_version_serves_only_once_its_engine_does(
    engines: Engines, versions: dict[int, Deployed], signer: Signer, data_dir: Path
) -> None:
    e, v2 = engines, versions[2]
    old_engines = engine_groups(data_dir)
    assert len(old_engines) == 1
    body, digest = v2.body(signer)
    result: dict[str, httpx.Response] = {}
    pusher = threading.Thread(target=lambda: result.setdefault("push", push(e.served, body, digest)))  # type: ignore[arg-type]
    tensors_v1 = e.embeds(torch.tensor([PROMPT]))
    plain = plaintext_last(e.original, torch.tensor([PROMPT]))
    served_v1 = 0
    pusher.start()
    while pusher.is_alive():  # the old version serves while the new engine starts
        reply = forward(e.served, e.credential, tensors_v1, key_version=1, output="last")  # type: ignore[arg-type]
        if reply.status_code == 200 and pusher.is_alive():
            assert_close(permute(plain, e.v1.pi_c), decoded(reply)[0]["logits"])
            served_v1 += 1
        time.sleep(1.0)
    pusher.join()
    assert result["push"].status_code == 200, result["push"].text
    assert served_v1 >= 1
    stale = forward(e.served, e.credential, tensors_v1, key_version=1, output="last")  # type: ignore[arg-type]
    assert_error(stale, 409, E_KEY_OUTDATED)
    x = helpers.embeds(e.original, torch.tensor([PROMPT]), v2.pi)
    out, _ = decoded(forward(e.served, e.credential, x, output="last"))  # type: ignore[arg-type]
    assert_close(permute(plain, v2.pi_c), out["logits"])  # embeds mode on v2 (P2 wrote its zero token table)
    wait_for(lambda: not group_members(old_engines), 60, "the old version's engine to end")
    assert len(engine_groups(data_dir)) == 1
    info = e.served.get(f"/v1/deployments/{DEPLOYMENT}").json()
    assert info["key_version"] == 2 and info["mode"] == "embeds"


def test_the_engine_ends_when_p2_is_killed(p2: tuple[subprocess.Popen, httpx.Client], data_dir: Path) -> None:
    proc, _ = p2
    groups = engine_groups(data_dir)
    assert len(groups) == 1 and len(group_members(groups)) >= 3  # v2's watchdog, server and engine core
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    wait_for(lambda: not group_members(groups), 60, "the engine processes to end after P2's SIGKILL")
