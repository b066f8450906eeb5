"""The generation loop of the user side (P3): prefill, then one new row per step, sampling here.

`token_stream` opens a P2 session (P2 keeps the KV cache), sends the prompt once and then each
drawn token; after a key rotation (409) or an expired or lost session it re-sends the prompt and
every token so far as one prefill in a new session, so the output continues unchanged (the
sampler's state is untouched). In token mode P2 generates instead (user_client.token_mode).
`StipClient.generate`, `stream`, `generate_ids` and `generate_steps` are thin calls into here.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple, TypedDict

import torch

from user_client import token_mode
from user_client.errors import KeyOutdated, SessionExpired
from user_client.sampling import Sampler, SamplingParams, TextAssembler

if TYPE_CHECKING:
    from user_client.client import Session, StipClient

log = logging.getLogger("stip.client")

MAX_RESTARTS = 3  # re-prefills of one generation after key rotations or expired sessions


class Step(NamedTuple):
    """One generated token with the plaintext scores it was drawn from (user side only).

    `scores` (V,) are the un-permuted logits of the position that chose the token, before any
    sampling processor. Unless the generation asked for `full_scores`, a greedy or top-k draw
    fetches only P2's top-k, and every other entry is -inf. In token mode P2 samples and no
    logits reach the user: `scores` is None (`full_scores=True` generates in embeds mode).
    """

    token_id: int
    scores: torch.Tensor | None  # (V,) float


class SamplingKwargs(TypedDict, total=False):
    """The fields of `SamplingParams`, as keyword conveniences of the generation calls."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    repetition_penalty: float
    seed: int | None


def sampling_params(params: SamplingParams | None, overrides: SamplingKwargs) -> SamplingParams:
    """`params` (default: `SamplingParams()`) with a call's keyword conveniences applied on top."""
    base = params if params is not None else SamplingParams()
    return replace(base, **overrides) if overrides else base


def next_scores(client: StipClient, session: Session, new_ids: list[int], k: int | None) -> torch.Tensor:
    """Send new tokens into the session; return plaintext scores (V,) of the last position.

    With `k`, only P2's top-k come back; the rest of the vocabulary scores -inf, which is
    exactly what the top-k filter (or the arg-max) would leave of the full logits.
    """
    ids = torch.tensor([new_ids], dtype=torch.long)
    if k is None:
        return client.forward(ids, session=session, output="last")[0, -1]
    top = client.forward_topk(ids, k=k, session=session)
    scores = torch.full((client.bundle.vocab_size,), float("-inf"))
    scores[top.token_ids[0, -1]] = top.values[0, -1]
    return scores


def token_stream(
    client: StipClient,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_ids: frozenset[int],
    *,
    full_scores: bool = False,
) -> Generator[Step, None, None]:
    """Generated tokens, one `Step` per step, including a final EOS token if one is drawn.

    `full_scores` fetches the whole vocabulary's logits at every step (for log-probabilities)
    instead of P2's top-k where those alone decide the draw.
    """
    bundle = client.bundle
    if bundle.is_encoder:
        raise ValueError(f"generation needs a decoder; {bundle.family.name} is an encoder")
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    client._check_ids(bundle, torch.tensor(prompt_ids))
    limit = bundle.max_positions
    if limit is not None and len(prompt_ids) >= limit:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
    if params.max_new_tokens == 0:
        return
    if client.mode == "token" and not full_scores:  # P2 samples: no logits reach the user
        for token in token_mode.token_stream(client, prompt_ids, params, eos_ids):
            yield Step(token, None)
        return
    sampler = Sampler(params)
    k = None if full_scores else params.topk_shortcut()
    if k is not None:
        k = min(k, bundle.vocab_size)
    generated: list[int] = []
    restarts = 0
    while True:
        stale = client.bundle
        try:
            with client.session() as session:
                # prefill: the prompt, plus what was generated before a restart
                scores = next_scores(client, session, prompt_ids + generated, k)
                while True:
                    token = sampler.choose(prompt_ids + generated, scores)
                    generated.append(token)
                    yield Step(token, scores)
                    if len(generated) >= params.max_new_tokens or token in eos_ids:
                        return
                    if limit is not None and len(prompt_ids) + len(generated) >= limit:
                        log.info("generation stopped: the context of %d positions is full", limit)
                        return
                    scores = next_scores(client, session, [token], k)
        except (KeyOutdated, SessionExpired) as e:
            restarts += 1
            if restarts > MAX_RESTARTS:
                raise
            if isinstance(e, KeyOutdated):
                client._refresh_after_outdated(stale, e)
            log.info(
                "re-sending %d tokens in a new session after %s",
                len(prompt_ids) + len(generated),
                type(e).__name__,
            )


def text_stream(
    client: StipClient,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_ids: frozenset[int],
    stop: Sequence[str],
    ids_out: list[int] | None = None,
) -> Iterator[str]:
    """Text pieces as they become final, up to the first `stop` string (excluded)."""
    assembler = TextAssembler(client.bundle.tokenizer, stop)
    tokens = token_stream(client, prompt_ids, params, eos_ids)
    try:
        for token, _ in tokens:
            if ids_out is not None:
                ids_out.append(token)
            piece = assembler.push(token)
            if piece:
                yield piece
            if assembler.stopped:
                return
        rest = assembler.finish()
        if rest:
            yield rest
    finally:
        tokens.close()  # deletes the P2 session if we stop early
