"""End to end: `stip gateway` as a real process in front of real P1 and P2 processes, driven by
the `openai` package (sync and async, streaming and not), every byte P2 receives recorded.

Checks: greedy completions and chats equal the original model's `generate()` decoded;
seeded sampling equals `generate(do_sample=True)` under the same seed; logprobs equal
log_softmax of the original logits; MiniLM embeddings (floats and base64) equal
sentence-transformers'; OpenAI-shaped errors with OpenAI's statuses (unknown model, wrong
kind, no chat template, P2 down, the gateway's own key); a key rotation under traffic; and
nothing P2 received holds a token id, a plaintext embedding row or any text.
"""

import asyncio
import base64
import json
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
import transformers
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from developer_service.client import DeveloperAdminClient
from shared.keys import DeveloperKey
from shared.permutation import permute
from stip_demo.models import make_random_llama, minilm_path
from tests.e2e.processes import CLOUD, DEVELOPER, GATEWAY, free_port, start, stop, wait_ready
from tests.e2e.proxy import RecordingProxy, int_patterns
from user_client.gateway.app import create_app
from user_client.gateway.settings import GatewaySettings

PROMPT = "private inference on permuted weights"
CHAT: list[Any] = [
    {"role": "system", "content": "you answer briefly"},
    {"role": "user", "content": "what does the cloud see of my secret question?"},
]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
SENTENCES = [
    "A man is eating food.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Secure inference keeps both the model and the data private.",
    "Short.",
]
MAX_TOKENS = 20


@dataclass
class Stack:
    work: Path
    admin: DeveloperAdminClient
    proxy: RecordingProxy
    gateway_url: str
    deployments: dict[str, str]  # llama, minilm -> deployment id
    llama_dir: Path
    env: dict[str, str]  # the gateway's environment (credentials, P1 URL)
    config: Path
    texts: list[str]  # every prompt and answer that went through the gateway, for the leak check

    def sync(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway_url}/v1", api_key="unused", max_retries=0, timeout=120)

    def aio(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.gateway_url}/v1", api_key="unused", max_retries=0, timeout=120)

    def developer_key(self, name: str) -> DeveloperKey:
        dep = self.admin.deployment(self.deployments[name])
        version_dir = self.work / "dev" / "deployments" / dep.deployment_id / f"v{dep.key_version}"
        return DeveloperKey.load(version_dir / "developer" / "key.safetensors")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("gateway")
    admin_token, push_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    cloud_port, dev_port, gateway_port, dead_port = free_port(), free_port(), free_port(), free_port()
    dev_url = f"http://127.0.0.1:{dev_port}"
    llama_dir = make_random_llama(work / "models" / "llama")
    procs: list[subprocess.Popen] = []
    with RecordingProxy(cloud_port) as proxy:
        try:
            procs.append(
                start(
                    CLOUD,
                    {"STIP_CLOUD_PUSH_TOKEN": push_token},
                    work / "cloud.log",
                    host="127.0.0.1",
                    port=cloud_port,
                    data_dir=work / "cloud",
                )
            )
            wait_ready(f"http://127.0.0.1:{cloud_port}", procs[-1])
            procs.append(
                start(
                    DEVELOPER,
                    {"STIP_DEVELOPER_ADMIN_TOKEN": admin_token, "STIP_DEVELOPER_PUSH_TOKEN": push_token},
                    work / "dev.log",
                    host="127.0.0.1",
                    port=dev_port,
                    data_dir=work / "dev",
                )
            )
            wait_ready(dev_url, procs[-1])
            admin = DeveloperAdminClient(dev_url, admin_token=admin_token)
            deployments, env = {}, {}
            for name, path in (("llama", llama_dir), ("minilm", minilm_path())):
                dep = admin.deploy(admin.register(path, name=name).model_id, cloud_url=f"http://127.0.0.1:{proxy.port}")
                status = admin.wait(dep.deployment_id, timeout_s=300)
                assert status.status == "active", status.error
                deployments[name] = dep.deployment_id
                env[f"{name.upper()}_CREDENTIAL"] = admin.issue_credential(dep.deployment_id, name="gw").credential
            (work / "chat.jinja").write_text(TEMPLATE)
            config = work / "gateway.toml"
            config.write_text(
                f"""
[models.llama]
deployment_id = "{deployments["llama"]}"
credential_env = "LLAMA_CREDENTIAL"
chat_template_file = "chat.jinja"

[models.llama-no-template]
deployment_id = "{deployments["llama"]}"
credential_env = "LLAMA_CREDENTIAL"

[models.llama-p2-down]
deployment_id = "{deployments["llama"]}"
credential_env = "LLAMA_CREDENTIAL"
cloud_url = "http://127.0.0.1:{dead_port}"

[models.minilm]
deployment_id = "{deployments["minilm"]}"
credential_env = "MINILM_CREDENTIAL"
"""
            )
            env |= {
                "STIP_CLIENT_DEVELOPER_URL": dev_url,
                "STIP_CLIENT_CACHE_DIR": str(work / "gateway-cache"),
                "STIP_CLIENT_RETRIES": "1",  # P2 down answers after one retry, not five
            }
            procs.append(start(GATEWAY, env, work / "gateway.log", host="127.0.0.1", port=gateway_port, config=config))
            gateway_url = f"http://127.0.0.1:{gateway_port}"
            wait_ready(gateway_url, procs[-1])
            yield Stack(work, admin, proxy, gateway_url, deployments, llama_dir, env, config, [PROMPT])
        finally:
            for proc in reversed(procs):
                stop(proc)


# --- plaintext references -------------------------------------------------------------------


def _tokenizer(stack: Stack) -> Any:
    return transformers.AutoTokenizer.from_pretrained(stack.llama_dir)


def _model(stack: Stack) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(stack.llama_dir).eval()


def _generate(stack: Stack, ids: list[int], **kw: Any) -> tuple[list[int], str]:
    """The original model's generate(): new token ids, and their text as an OpenAI answer holds it."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = _model(stack).generate(x, attention_mask=torch.ones_like(x), pad_token_id=0, **kw)
    new = out[0, len(ids) :].tolist()
    return new, _tokenizer(stack).decode(new, skip_special_tokens=True)


def _completion_ids(stack: Stack) -> list[int]:
    return [int(i) for i in _tokenizer(stack)(PROMPT)["input_ids"]]


def _chat_ids(stack: Stack) -> list[int]:
    enc = _tokenizer(stack).apply_chat_template(CHAT, chat_template=TEMPLATE, add_generation_prompt=True)
    return [int(i) for i in enc["input_ids"]]


def _finish(new_ids: list[int]) -> str:
    return "stop" if new_ids and new_ids[-1] == 102 else "length"  # 102: the random Llama's EOS


@pytest.fixture(scope="module")
def greedy(stack: Stack) -> tuple[list[int], str]:
    new, text = _generate(stack, _completion_ids(stack), max_new_tokens=MAX_TOKENS, do_sample=False)
    assert text.strip() and len(set(new)) > 3  # a real continuation
    stack.texts.append(text)
    return new, text


@pytest.fixture(scope="module")
def chat_greedy(stack: Stack) -> tuple[list[int], str]:
    new, text = _generate(stack, _chat_ids(stack), max_new_tokens=MAX_TOKENS, do_sample=False)
    assert text.strip()
    stack.texts += [text] + [m["content"] for m in CHAT]
    return new, text


# --- models ---------------------------------------------------------------------------------


def test_models_lists_each_model_with_its_mode(stack: Stack) -> None:
    models = {m.id: m for m in stack.sync().models.list()}
    assert set(models) == {"llama", "llama-no-template", "llama-p2-down", "minilm"}
    info = {name: m.model_extra["stip"] for name, m in models.items()}  # type: ignore[index]
    assert info["llama"]["mode"] == info["minilm"]["mode"] == "embeds"  # token mode does not exist yet
    assert info["llama"]["kind"] == "decoder" and info["minilm"]["kind"] == "encoder"
    assert info["llama"]["deployment_id"] == stack.deployments["llama"]
    assert stack.sync().models.retrieve("minilm").id == "minilm"


# --- completions ----------------------------------------------------------------------------


def test_greedy_completion_equals_generate(stack: Stack, greedy: tuple[list[int], str]) -> None:
    new, text = greedy
    out = stack.sync().completions.create(model="llama", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == _finish(new)
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(_completion_ids(stack))
    assert out.usage.completion_tokens == len(new)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    by_ids = stack.sync().completions.create(
        model="llama", prompt=_completion_ids(stack), max_tokens=MAX_TOKENS, temperature=0
    )
    assert by_ids.choices[0].text == text  # a prompt of token ids, tokenised by the caller


def test_streamed_completion_joins_to_the_same_text(stack: Stack, greedy: tuple[list[int], str]) -> None:
    new, text = greedy
    chunks = list(
        stack.sync().completions.create(
            model="llama",
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # really streamed
    assert "".join(pieces) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == _finish(new)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(new)


def test_the_sse_wire_format(stack: Stack) -> None:
    body = {"model": "llama", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{stack.gateway_url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event.removeprefix("data: "))["object"] == "text_completion"


def test_max_tokens_and_stop(stack: Stack, greedy: tuple[list[int], str]) -> None:
    _, text = greedy
    client = stack.sync()
    short = client.completions.create(model="llama", prompt=PROMPT, max_tokens=4, temperature=0, stop=None)
    new, expected = _generate(stack, _completion_ids(stack), max_new_tokens=4, do_sample=False)
    assert short.choices[0].text == expected
    assert short.choices[0].finish_reason == _finish(new) == "length"
    assert short.usage is not None and short.usage.completion_tokens == 4
    word = text.split()[len(text.split()) // 2]
    cut = client.completions.create(model="llama", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=[word])
    assert cut.choices[0].text == text[: text.find(word)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_equals_generate_and_n_choices(stack: Stack) -> None:
    ids = _completion_ids(stack)
    out = stack.sync().completions.create(
        model="llama", prompt=PROMPT, max_tokens=12, temperature=0.8, top_p=0.9, seed=1234, n=2
    )
    assert [c.index for c in out.choices] == [0, 1]
    for choice, seed in zip(out.choices, (1234, 1235), strict=True):  # choice i samples with seed + i
        torch.manual_seed(seed)
        _, expected = _generate(stack, ids, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, top_k=0)
        assert choice.text == expected
    assert out.choices[0].text != out.choices[1].text


def test_completion_logprobs_equal_the_original_logits(stack: Stack, greedy: tuple[list[int], str]) -> None:
    new, _ = greedy
    ids = _completion_ids(stack)
    out = stack.sync().completions.create(model="llama", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    with torch.no_grad():
        logits = _model(stack)(torch.tensor([ids + new[:5]])).logits[0]
    reference = torch.log_softmax(logits[len(ids) - 1 : len(ids) + 4], dim=-1)  # (5, V)
    tok = _tokenizer(stack)
    assert lp.tokens == [tok.decode([t]) for t in new[:5]]
    got = torch.tensor(lp.token_logprobs)
    assert (got - reference[torch.arange(5), torch.tensor(new[:5])]).abs().max() <= 1e-4
    for step, top in enumerate(lp.top_logprobs):
        values, index = reference[step].topk(3)
        assert sorted(top.values(), reverse=True) == pytest.approx(values.tolist(), abs=1e-4)
        assert set(top) == {tok.decode([int(i)]) for i in index}


# --- chat -----------------------------------------------------------------------------------


def test_async_chat_with_the_template_equals_generate(stack: Stack, chat_greedy: tuple[list[int], str]) -> None:
    new, text = chat_greedy

    async def run() -> list[Any]:  # three at once: the gateway serves them concurrently
        async with stack.aio() as client:
            calls = [
                client.chat.completions.create(model="llama", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
                for _ in range(3)
            ]
            return list(await asyncio.gather(*calls))

    answers = asyncio.run(run())
    assert [a.choices[0].message.content for a in answers] == [text] * 3
    out = answers[0]
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text
    assert out.choices[0].finish_reason == _finish(new)
    assert out.usage.prompt_tokens == len(_chat_ids(stack)) and out.usage.completion_tokens == len(new)


def test_async_chat_stream_with_logprobs(stack: Stack, chat_greedy: tuple[list[int], str]) -> None:
    new, text = chat_greedy
    ids = _chat_ids(stack)

    async def run() -> list[Any]:
        async with stack.aio() as client:
            stream = await client.chat.completions.create(
                model="llama",
                messages=CHAT,
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                logprobs=True,
                top_logprobs=2,
            )
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == _finish(new)
    entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert len(entries) == len(new)
    with torch.no_grad():
        logits = _model(stack)(torch.tensor([ids + new])).logits[0]
    reference = torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(new)], dim=-1)
    got = torch.tensor([e.logprob for e in entries])
    assert (got - reference[torch.arange(len(new)), torch.tensor(new)]).abs().max() <= 1e-4
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in entries)


def test_sync_chat_stream(stack: Stack, chat_greedy: tuple[list[int], str]) -> None:
    _, text = chat_greedy
    stream = stack.sync().chat.completions.create(
        model="llama",
        messages=CHAT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text


def _p2_sessions(stack: Stack) -> float:
    metrics = httpx.get(f"http://127.0.0.1:{stack.proxy.target_port}/metrics", timeout=10).text
    line = next(x for x in metrics.splitlines() if x.startswith("stip_cloud_active_sessions "))
    return float(line.split()[1])


def test_a_client_leaving_mid_stream_frees_its_p2_session(stack: Stack) -> None:
    body = {"model": "llama", "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{stack.gateway_url}/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert _p2_sessions(stack) == 1  # the generation is running
    deadline = time.monotonic() + 30
    while _p2_sessions(stack) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _p2_sessions(stack) == 0


# --- embeddings -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_embeddings() -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    return torch.from_numpy(SentenceTransformer(str(minilm_path()), device="cpu").encode(SENTENCES))


def _cosines(rows: list[list[float]], reference: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(torch.tensor(rows), reference, dim=-1)


def test_embeddings_equal_sentence_transformers(stack: Stack, reference_embeddings: torch.Tensor) -> None:
    stack.texts += SENTENCES
    out = stack.sync().embeddings.create(model="minilm", input=SENTENCES, encoding_format="float")
    assert [d.index for d in out.data] == list(range(len(SENTENCES)))
    assert float(_cosines([d.embedding for d in out.data], reference_embeddings).min()) >= 0.99999
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    assert out.usage.prompt_tokens == out.usage.total_tokens == sum(len(i) for i in tok(SENTENCES)["input_ids"])

    async def run() -> Any:  # the package's default: base64 on the wire, decoded by the client
        async with stack.aio() as client:
            return await client.embeddings.create(model="minilm", input=SENTENCES)

    decoded = asyncio.run(run())
    assert float(_cosines([d.embedding for d in decoded.data], reference_embeddings).min()) >= 0.99999
    raw = httpx.post(
        f"{stack.gateway_url}/v1/embeddings",
        json={"model": "minilm", "input": SENTENCES[0], "encoding_format": "base64"},
        timeout=120,
    ).json()
    row = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert row.shape == (384,) and np.allclose(row, out.data[0].embedding, atol=1e-6)


# --- errors ---------------------------------------------------------------------------------


def test_errors_have_openai_shapes_and_statuses(stack: Stack) -> None:
    client = stack.sync()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x")
    assert e.value.code == "model_not_found" and "llama" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="llama", input="x")
    assert e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llama-no-template", messages=CHAT)
    assert e.value.code == "chat_template_missing" and "chat_template_file" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama", prompt="x", temperature=3)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama", prompt="x", frequency_penalty=0.5)
    assert e.value.param == "frequency_penalty"
    r = httpx.post(f"{stack.gateway_url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_p2_down_is_a_503_before_the_stream_starts(stack: Stack) -> None:
    client = stack.sync()
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="llama-p2-down", prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 503 and e.value.code == "upstream_unavailable"
    assert "cannot connect" in e.value.message
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="llama-p2-down", prompt=PROMPT, stream=True)
    assert e.value.status_code == 503


def test_the_gateway_api_key(stack: Stack) -> None:
    """In process (`create_app`) against the same P1 and P2: with a key, /v1 needs it."""
    key = secrets.token_urlsafe(16)
    env = {k: v for k, v in stack.env.items() if k.endswith("_CREDENTIAL")}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {**env, "STIP_CLIENT_DEVELOPER_URL": stack.env["STIP_CLIENT_DEVELOPER_URL"]}.items():
            mp.setenv(name, value)
        mp.setenv("STIP_CLIENT_CACHE_DIR", str(stack.work / "key-cache"))
        settings = GatewaySettings(api_key=key, deployments=f"minilm={stack.deployments['minilm']}:MINILM_CREDENTIAL")
        with pytest.raises(ValueError, match="API key"):
            GatewaySettings(host="0.0.0.0", deployments="x=y").check_exposure()
        with TestClient(create_app(settings)) as http:
            refused = http.get("/v1/models")
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
            assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert http.get("/health/live").status_code == 200  # health stays open
            ok = http.post(
                "/v1/embeddings", json={"model": "minilm", "input": "hello"}, headers={"Authorization": f"Bearer {key}"}
            )
            assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 384


# --- rotation, then the leak check ----------------------------------------------------------


def test_rotation_under_traffic(stack: Stack, chat_greedy: tuple[list[int], str]) -> None:
    """Chats keep answering, and answer the same, while P1 rotates the deployment's key."""
    _, text = chat_greedy
    dep = stack.deployments["llama"]
    before = stack.admin.deployment(dep).key_version
    results: list[str | BaseException] = []
    done = threading.Event()

    def traffic() -> None:
        client = stack.sync()
        while not done.is_set():
            try:
                stream = client.chat.completions.create(
                    model="llama", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True
                )
                results.append("".join(c.choices[0].delta.content or "" for c in stream))
            except BaseException as e:
                results.append(e)
                return

    worker = threading.Thread(target=traffic)
    worker.start()
    stack.admin.rotate(dep)
    status = stack.admin.wait(dep, timeout_s=300)
    for _ in range(2):  # wait for generations that ran under the new key
        n = len(results)
        while len(results) == n and worker.is_alive():
            worker.join(0.2)
    done.set()
    worker.join(120)
    assert status.status == "active" and status.key_version == before + 1
    assert results and all(r == text for r in results), results
    models = {m.id: m.model_extra["stip"] for m in stack.sync().models.list()}  # type: ignore[index]
    assert models["llama"]["key_version"] == before + 1


def test_p2_received_no_token_id_no_embedding_row_and_no_text(
    stack: Stack, greedy: tuple[list[int], str], chat_greedy: tuple[list[int], str]
) -> None:
    """Over all the traffic of this module, and at least the three calls made here."""
    ids = _completion_ids(stack)
    client = stack.sync()
    assert client.completions.create(model="llama", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert client.chat.completions.create(model="llama", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert client.embeddings.create(model="minilm", input=SENTENCES)
    stack.texts += SENTENCES
    received = stack.proxy.received
    assert len(received) > 10_000_000  # the pushes went through the proxy

    # positive control: the recording holds x·π of this prompt under the current key, byte for byte
    llama = load_file(str(stack.llama_dir / "model.safetensors"))["model.embed_tokens.weight"]
    assert permute(llama[torch.tensor(ids)], stack.developer_key("llama").pi).numpy().tobytes() in received

    tok = _tokenizer(stack)
    minilm = load_file(str(minilm_path() / "model.safetensors"))["embeddings.word_embeddings.weight"]
    sentence_ids = [t for ids_ in tok(SENTENCES)["input_ids"] for t in ids_]
    forbidden: list[tuple[str, bytes]] = []
    for what, seq in (("completion prompt", ids), ("chat prompt", _chat_ids(stack)), ("sentences", sentence_ids)):
        forbidden += [(f"{what} token ids", p) for p in int_patterns(torch.tensor(seq))]
    forbidden += [(f"llama embedding row {t}", llama[t].numpy().tobytes()) for t in set(ids + _chat_ids(stack))]
    forbidden += [(f"MiniLM embedding row {t}", minilm[t].numpy().tobytes()) for t in set(sentence_ids)]
    assert len(stack.texts) >= 3 + len(CHAT) + len(SENTENCES)  # prompts, answers, messages, sentences
    for text in stack.texts:
        forbidden += [(f"text {text[:20]!r}", text.encode(enc)) for enc in ("utf-8", "utf-16-le") if len(text) > 4]
    leaks = [what for what, pattern in forbidden if pattern in received]
    assert leaks == []


def test_the_gateway_log_holds_no_credential_and_no_text(stack: Stack, greedy: tuple[list[int], str]) -> None:
    assert stack.sync().completions.create(model="llama", prompt=PROMPT, max_tokens=2, temperature=0)
    log = (stack.work / "gateway.log").read_text(errors="replace")
    assert "POST /v1/completions" in log  # the access log is there
    credentials = [v for k, v in stack.env.items() if k.endswith("_CREDENTIAL")]
    assert len(credentials) == 2
    for secret in credentials:
        assert secret not in log and secret.rpartition(".")[2] not in log
    assert [t for t in stack.texts if t in log] == []
