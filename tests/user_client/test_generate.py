"""Decoders through the SDK against the original model: forward, greedy and seeded generation,
streaming, stop conditions, sessions, and recovery from a key rotation mid-generation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from shared import api
from tests.support import max_abs_diff
from tests.user_client.conftest import SEP, World, reference_model
from user_client import SessionExpired, StipClient
from user_client.sampling import SamplingParams

PROMPT = [101, 2023, 2003, 1037, 3231, 1997, 1996, 10938, 2015]  # "[CLS] this is a test of the ..."
TOL = 1e-4


def hf_generate(model_dir: Path, ids: list[int], **kw: object) -> list[int]:
    model = reference_model(model_dir)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), pad_token_id=0, **kw)
    return out[0, len(ids) :].tolist()


@pytest.fixture(params=["llama", "gpt2"])
def decoder(request: pytest.FixtureRequest, llama_dir: Path, gpt2_dir: Path) -> tuple[str, Path]:
    return request.param, {"llama": llama_dir, "gpt2": gpt2_dir}[request.param]


def test_forward_matches_original_logits(
    decoder: tuple[str, Path], make_client: Callable[..., StipClient], world: World
) -> None:
    dep, model_dir = decoder
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        expected = reference_model(model_dir)(ids).logits
    client = make_client(dep)
    logits = client.forward(ids)
    assert logits.shape == expected.shape
    assert max_abs_diff(logits, expected) <= TOL
    last = client.forward(ids, output="last")
    assert last.shape == (2, 1, expected.shape[-1])
    assert max_abs_diff(last, expected[:, -1:]) <= TOL
    top = client.forward_topk(ids, k=5)  # the last position
    ref = torch.topk(expected[:, -1:], 5, dim=-1)
    assert torch.equal(top.token_ids, ref.indices)
    assert max_abs_diff(top.values, ref.values) <= TOL
    # P2 got only permuted embeddings: never a token id
    assert all(f["names"] == [api.INPUTS_EMBEDS] for f in world.cloud.forwards)


def test_session_positions_continue(decoder: tuple[str, Path], make_client: Callable[..., StipClient]) -> None:
    dep, model_dir = decoder
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = reference_model(model_dir)(ids).logits
    client = make_client(dep)
    with client.session() as s:
        first = client.forward(ids[:, :4], session=s)
        second = client.forward(ids[:, 4:], session=s)
        assert s.length == ids.shape[1]
    assert max_abs_diff(torch.cat([first, second], dim=1), expected) <= TOL


def test_greedy_matches_hf_generate(
    decoder: tuple[str, Path], make_client: Callable[..., StipClient], world: World
) -> None:
    dep, model_dir = decoder
    expected = hf_generate(model_dir, PROMPT, max_new_tokens=16, do_sample=False)
    client = make_client(dep)
    ours = client.generate_ids(PROMPT, max_new_tokens=16)
    assert ours == expected
    # one prefill of the prompt, then ONE row per step; greedy needs P2's top-1 only
    shapes = [f["shape"][:2] for f in world.cloud.forwards]
    assert shapes == [(1, len(PROMPT))] + [(1, 1)] * (len(ours) - 1)
    assert {(f["output"], f["k"]) for f in world.cloud.forwards} == {("topk", 1)}
    assert len({f["session"] for f in world.cloud.forwards}) == 1
    assert world.cloud.sessions == {}  # deleted at the end


def test_repetition_penalty_matches_hf(llama_dir: Path, make_client: Callable[..., StipClient], world: World) -> None:
    expected = hf_generate(llama_dir, PROMPT, max_new_tokens=12, do_sample=False, repetition_penalty=1.5)
    ours = make_client().generate_ids(PROMPT, max_new_tokens=12, repetition_penalty=1.5)
    assert ours == expected
    assert {f["output"] for f in world.cloud.forwards} == {"last"}  # needs the full logits


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=0.9, top_k=40),
        dict(temperature=1.0, top_p=0.9),
        dict(temperature=0.7, top_k=100, top_p=0.8, repetition_penalty=1.2),
    ],
)
def test_seeded_sampling_matches_hf_and_repeats(
    options: dict[str, Any], llama_dir: Path, make_client: Callable[..., StipClient]
) -> None:
    client = make_client()
    a = client.generate_ids(PROMPT, max_new_tokens=16, seed=1234, eos=False, **options)
    b = client.generate_ids(PROMPT, max_new_tokens=16, seed=1234, eos=False, **options)
    c = client.generate_ids(PROMPT, max_new_tokens=16, seed=99, eos=False, **options)
    assert a == b and len(a) == 16
    assert a != c
    hf_options = dict(options, top_k=options.get("top_k", 0))  # HF's default top_k is 50
    torch.manual_seed(1234)
    expected = hf_generate(llama_dir, PROMPT, max_new_tokens=16, do_sample=True, eos_token_id=None, **hf_options)
    assert a == expected


def test_one_sampling_params_for_every_call_matches_hf(llama_dir: Path, make_client: Callable[..., StipClient]) -> None:
    """`SamplingParams` in place of the keywords: the same seeded draw as transformers; a keyword
    given beside it overrides that one field."""
    client = make_client()
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, seed=7)
    ids = client.generate_ids(PROMPT, params, eos=False)
    torch.manual_seed(7)
    expected = hf_generate(
        llama_dir, PROMPT, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, eos_token_id=None
    )
    assert ids == expected
    assert [s.token_id for s in client.generate_steps(PROMPT, params, eos=False)] == ids
    assert client.generate_ids(PROMPT, params, eos=False, max_new_tokens=5) == ids[:5]
    text = client.generate("this is a test", params, eos=False)
    assert "".join(client.stream("this is a test", params, eos=False)) == text
    assert text == client.generate("this is a test", eos=False, **dataclasses.asdict(params))


def test_stream_joins_to_generate(make_client: Callable[..., StipClient]) -> None:
    client = make_client()
    prompt = "this is a test of the"
    text = client.generate(prompt, max_new_tokens=24, eos=False)
    pieces = list(client.stream(prompt, max_new_tokens=24, eos=False))
    assert len(pieces) > 1
    assert "".join(pieces) == text
    ids = client.generate_ids(client._prompt_ids(prompt, True), max_new_tokens=24, eos=False)
    assert text == client.bundle.tokenizer.decode(ids, skip_special_tokens=True)
    assert text.strip()


def test_stop_strings(make_client: Callable[..., StipClient], world: World) -> None:
    client = make_client()
    prompt = "once upon a time"
    full = client.generate(prompt, max_new_tokens=24, eos=False)
    words = full.split()
    assert len(words) >= 4
    stop = " ".join(words[2:4])
    cut = full.index(stop)
    assert client.generate(prompt, max_new_tokens=24, eos=False, stop=[stop]) == full[:cut]
    assert "".join(client.stream(prompt, max_new_tokens=24, eos=False, stop=[stop])) == full[:cut]
    ids = client.generate_ids(client._prompt_ids(prompt, True), max_new_tokens=24, eos=False, stop=[stop])
    assert len(ids) < 24  # stopped early
    assert world.cloud.sessions == {}


def test_eos_ends_generation(make_client: Callable[..., StipClient]) -> None:
    client = make_client()
    free = client.generate_ids(PROMPT, max_new_tokens=16, eos=False)
    assert SEP not in free[:4] or free.index(SEP) >= 3  # the tiny model rarely says [SEP]
    eos = free[3]
    ids = client.generate_ids(PROMPT, max_new_tokens=16, eos=eos)
    assert ids == free[: free.index(eos) + 1]
    assert client.bundle.eos_token_ids() == {SEP}  # from generation_config.json


def test_context_limit(make_client: Callable[..., StipClient]) -> None:
    client = make_client("gpt2")  # n_positions = 48, learned positions
    prompt = (PROMPT * 5)[:44]
    ids = client.generate_ids(prompt, max_new_tokens=16, eos=False)
    assert len(prompt) + len(ids) == 48
    with pytest.raises(ValueError, match="context"):
        client.generate_ids(PROMPT * 6, max_new_tokens=4)


def test_key_rotation_mid_generation(llama_dir: Path, make_client: Callable[..., StipClient], world: World) -> None:
    expected = hf_generate(llama_dir, PROMPT, max_new_tokens=16, do_sample=False)
    client = make_client()
    assert client.key_version == 1
    calls = {"n": 0}

    def rotate_after_five(state: object) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            world.rotate("llama", 2)

    world.cloud.after_forward = rotate_after_five
    assert client.generate_ids(PROMPT, max_new_tokens=16) == expected
    assert client.key_version == 2
    assert world.developer.fetches == 2
    sessions = [f["session"] for f in world.cloud.forwards]
    assert len(set(sessions)) == 2
    # the new session's prefill re-sent the prompt plus the 5 tokens generated so far
    restart = sessions.index(sessions[-1])
    assert world.cloud.forwards[restart]["shape"][1] == len(PROMPT) + 5
    assert world.cloud.sessions == {}


def test_expired_session_is_reopened(llama_dir: Path, make_client: Callable[..., StipClient], world: World) -> None:
    client = make_client()
    expected = client.generate_ids(PROMPT, max_new_tokens=10)
    calls = {"n": 0}

    def expire(state: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            world.cloud.sessions.clear()

    world.cloud.after_forward = expire
    assert client.generate_ids(PROMPT, max_new_tokens=10) == expected
    assert world.developer.fetches == 1


def test_repeated_expiry_gives_up(make_client: Callable[..., StipClient], world: World) -> None:
    world.cloud.after_forward = lambda state: world.cloud.sessions.clear()
    with pytest.raises(SessionExpired):
        make_client().generate_ids(PROMPT, max_new_tokens=10)


def test_abandoned_stream_deletes_session(make_client: Callable[..., StipClient], world: World) -> None:
    client = make_client()
    stream = client.stream("this is a test", max_new_tokens=32, eos=False)
    next(stream)
    assert len(world.cloud.sessions) == 1
    stream.close()  # type: ignore[attr-defined]
    assert world.cloud.sessions == {}


def test_close_deletes_open_sessions(make_client: Callable[..., StipClient], world: World) -> None:
    client = make_client()
    s = client.open_session()
    client.forward([PROMPT], session=s)
    assert len(world.cloud.sessions) == 1
    client.close()
    assert world.cloud.sessions == {} and s.closed


def test_sampling_options_are_checked(make_client: Callable[..., StipClient]) -> None:
    client = make_client()
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2), dict(repetition_penalty=0.0)):
        with pytest.raises(ValueError):
            client.generate_ids(PROMPT, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token ids"):
        client.forward([[0, 30522]])


def test_p2_sees_no_key_and_no_token_ids(make_client: Callable[..., StipClient], world: World) -> None:
    client = make_client()
    client.generate("this is a test", max_new_tokens=6, eos=False)
    client.forward([PROMPT])
    key = client.bundle.key
    secrets = [key.pi.numpy().tobytes(), key.pi_c.numpy().tobytes()[:4096]]
    ids = torch.tensor(PROMPT).numpy().tobytes()
    for body in world.cloud.bodies:
        assert not any(s in body for s in secrets)
        assert ids not in body
    assert {name for f in world.cloud.forwards for name in f["names"]} == {api.INPUTS_EMBEDS}


def test_generate_steps_carry_the_original_logits(
    llama_dir: Path, make_client: Callable[..., StipClient], world: World
) -> None:
    """The hook the gateway's logprobs use: each step's scores are the plaintext logits."""
    client = make_client()
    steps = list(client.generate_steps(PROMPT, max_new_tokens=6, eos=False, full_scores=True))
    ids = [step.token_id for step in steps]
    assert ids == hf_generate(llama_dir, PROMPT, max_new_tokens=6, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        logits = reference_model(llama_dir)(torch.tensor([PROMPT + ids])).logits[0]
    expected = logits[len(PROMPT) - 1 : len(PROMPT) - 1 + len(ids)]  # (6, V): the logits that chose each token
    assert max_abs_diff(torch.stack([step.scores for step in steps]), expected) <= TOL
    # without full_scores, greedy fetches P2's top-1 only: every other score is -inf
    lean_steps = client.generate_steps(PROMPT, max_new_tokens=1)
    lean = next(lean_steps)
    lean_steps.close()  # deletes the P2 session
    assert lean.token_id == ids[0] and int(torch.isfinite(lean.scores).sum()) == 1
