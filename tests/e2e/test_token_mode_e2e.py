"""End to end in token mode (PROTOCOL.md section 7): P1 (token mode enabled) and P2 as real
processes on loopback, every byte P2 receives recorded by a proxy, P3 through the SDK and `stip`.

Greedy generation equals the stock `generate()` token for token (Llama with GQA, tied and untied,
and GPT-2); the text equals embeds mode's on the same deployment, stop strings included; sampling
with a seed is reproducible; and what P2 received holds the prompt relabelled by π_c, never the
real ids, and no text.
"""

import json
import os
import re
import subprocess
from collections.abc import Iterator

import pytest
import torch
import transformers

from stip_demo.models import copy_tokenizer
from tests.e2e.processes import BIN
from tests.e2e.reference import stock_generate
from tests.e2e.stack import ProxiedStack as Stack
from tests.e2e.stack import proxied_stack
from tests.support import randomize_parameters

NEW_TOKENS = 16
PROMPT = "the quick brown fox jumps over the lazy dog"
PROMPT_IDS = [101, 2023, 2003, 1037, 3231, 1997, 2797, 28937, 1012]
VOCAB = 30522  # MiniLM's WordPiece tokenizer
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=64,  # head size 32 (GQA 2:1): vLLM's CPU attention takes 32, 64, 80, ...
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=128,
    bos_token_id=101,
    eos_token_id=102,
    pad_token_id=0,
)
# what a request to P2 says whatever its text (test_p2_received_relabelled_ids_only blanks it)
PROTOCOL_WORDS = [
    rb"(?m)^(?:GET|POST|PUT|DELETE) /\S* HTTP/1\.1",  # request lines: the routes' names
    rb"(?im)^(?:host|user-agent|accept(?:-encoding)?|connection|content-(?:type|length)|authorization|x-stip-\S+): .*$",
    rb'"\w+":',  # JSON keys
    rb"\b(?:null|true|false)\b",  # JSON literals
    rb"[0-9a-f]{12,}",  # random ids
]
MODELS = {  # name: (config class, model class, config, seed)
    "llama-untied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(LLAMA), 1),
    "llama-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(LLAMA, tie_word_embeddings=True), 2),
    "gpt2": (
        transformers.GPT2Config,
        transformers.GPT2LMHeadModel,
        dict(vocab_size=VOCAB, n_embd=32, n_head=4, n_layer=2, n_positions=128, bos_token_id=101, eos_token_id=102),
        3,
    ),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("e2e-token-mode")
    with proxied_stack(work, {"STIP_DEVELOPER_ALLOW_TOKEN_MODE": "true"}) as s:
        for name, (config_cls, model_cls, config, seed) in MODELS.items():
            model = model_cls(config_cls(**config))
            randomize_parameters(model, seed=seed)
            model.config.architectures = [model_cls.__name__]
            path = work / "models" / name
            model.save_pretrained(path)
            copy_tokenizer(path)
            _, status = s.deploy(name, path, mode="token")
            assert status.mode == "token"
        yield s


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generation_equals_generate(stack: Stack, name: str) -> None:
    with stack.client(name) as client:
        assert client.mode == "token"
        private = client.generate_ids(PROMPT_IDS, max_new_tokens=NEW_TOKENS, temperature=0.0, eos=False)
    expected = stock_generate(stack.model_dirs[name], PROMPT_IDS, NEW_TOKENS)
    assert private == expected
    assert len(set(private)) > 2  # a real continuation, not one token repeated


def test_text_and_stop_strings_equal_embeds_mode(stack: Stack) -> None:
    with stack.client("llama-untied") as client:
        token_text = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, eos=False)
        pieces = list(client.stream(PROMPT, max_new_tokens=NEW_TOKENS, eos=False))
        client.mode = "embeds"  # every deployment serves embeds mode too
        embeds_text = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, eos=False)
        stop = token_text.split()[3]
        stopped_embeds = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, eos=False, stop=[stop])
        client.mode = "token"
        stopped_token = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, eos=False, stop=[stop])
    assert token_text == embeds_text == "".join(pieces) and len(pieces) > 3
    assert stopped_token == stopped_embeds and stop not in stopped_token and len(stopped_token) < len(token_text)


def test_seeded_sampling_is_reproducible(stack: Stack) -> None:
    options = dict(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=0.95, eos=False)
    with stack.client("gpt2") as client:
        runs = [client.generate_ids(PROMPT_IDS, seed=seed, **options) for seed in (5, 5, 6)]  # type: ignore[arg-type]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert all(0 <= t < VOCAB for t in runs[0])


def test_p2_received_relabelled_ids_only(stack: Stack) -> None:
    name = "llama-tied"
    before = len(stack.proxy.received)
    with stack.client(name) as client:
        text = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, eos=False)
        pi_c = client.bundle.key.pi_c
        real = client.bundle.tokenizer(PROMPT)["input_ids"]
    received = stack.proxy.received[before:]
    bodies = [json.loads(m) for m in re.findall(rb'\{"input_ids".*?"stream":true\}', received)]
    assert len(bodies) == 1
    assert bodies[0]["input_ids"] == torch.argsort(pi_c)[torch.tensor(real)].tolist()  # relabelled ...
    assert bodies[0]["input_ids"] != real  # ... not the real ids
    assert json.dumps(real, separators=(",", ":")).encode()[1:-1] not in received
    # The random text's words are matched as substrings, so the protocol's own words (the route
    # ".../generate" holds "genera", a word the random Llama once wrote), the fixed headers and
    # JSON keys, and the random credentials and ids (base64url / hex: "de" occurs by chance) are
    # blanked before the text check; any other header and every value stay checked.
    fixed = received
    for pattern in PROTOCOL_WORDS:
        fixed = re.sub(pattern, b"", fixed)
    for word in PROMPT.split() + text.split():
        assert word.encode() not in fixed, word  # no text


def test_stip_generate_works_unchanged(stack: Stack) -> None:
    env = {
        **os.environ,
        "STIP_CLIENT_DEVELOPER_URL": stack.dev_url,
        "STIP_CLIENT_DEPLOYMENT_ID": stack.deployments["gpt2"],
        "STIP_CLIENT_CREDENTIAL": stack.credential("gpt2"),
        "STIP_CLIENT_CACHE_DIR": str(stack.work / "cli-cache"),
    }
    cmd = [str(BIN / "stip"), "generate", PROMPT, "-v", "--max-new-tokens", "8", "--no-eos"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "token mode" in result.stderr  # the SDK says which mode it uses
    with stack.client("gpt2") as client:
        assert result.stdout.strip() == client.generate(PROMPT, max_new_tokens=8, eos=False).strip()


def test_a_rotation_relabels_and_the_client_follows(stack: Stack) -> None:
    """After a rotation P2 refuses ids relabelled under the old π_c (409); the SDK refetches the
    bundle, relabels under the new key and gets the same tokens."""
    name = "llama-untied"
    with stack.client(name) as client:
        old = client.bundle
        before = client.generate_ids(PROMPT_IDS, max_new_tokens=8, eos=False)
        deployment_id = stack.deployments[name]
        stack.admin.rotate(deployment_id)
        assert stack.admin.wait(deployment_id, timeout_s=300).key_version == 2
        assert client.bundle is old  # still the old key, until P2 says so
        after = client.generate_ids(PROMPT_IDS, max_new_tokens=8, eos=False)
        assert client.key_version == 2 and not torch.equal(client.bundle.key.pi_c, old.key.pi_c)
    assert after == before == stock_generate(stack.model_dirs[name], PROMPT_IDS, 8)
