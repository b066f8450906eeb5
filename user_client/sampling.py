"""Local sampling and incremental detokenization (user side: P2 never sees a token id).

Sampling applies the Hugging Face logits processors themselves, in the order `generate()`
builds them: repetition penalty, then (only when sampling) temperature, top-k, top-p; then
argmax (temperature 0) or `torch.multinomial` with a seeded `torch.Generator`. With the same
seed this draws the same tokens as `transformers`' `generate(do_sample=True)` after
`torch.manual_seed(seed)`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None  # None or 0: no top-k filter (unlike HF's default of 50)
    top_p: float | None = None  # None or 1.0: no nucleus filter
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: a fresh random seed per generation

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def top_k_active(self) -> int | None:
        return self.top_k if self.top_k else None

    def topk_shortcut(self) -> int | None:
        """k such that P2's top-k values alone determine the next token exactly, else None.

        Greedy needs the arg-max only; top-k sampling discards everything outside the top k
        (temperature is monotone and top-p acts after top-k). A repetition penalty can lift a
        token from outside the top k, so it needs the full distribution.
        """
        if self.repetition_penalty != 1.0:
            return None
        if self.greedy:
            return 1
        return self.top_k_active


class Sampler:
    """Chooses the next token from plaintext scores, exactly as HF's processors define it."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        procs: list[Any] = []
        if params.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
        if not params.greedy:
            if params.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(float(params.temperature)))
            if params.top_k_active:
                procs.append(TopKLogitsWarper(top_k=params.top_k_active, min_tokens_to_keep=1))
            if params.top_p is not None and params.top_p < 1.0:
                procs.append(TopPLogitsWarper(top_p=float(params.top_p), min_tokens_to_keep=1))
        self.processors = LogitsProcessorList(procs)

    def choose(self, ids: Sequence[int], scores: torch.Tensor) -> int:
        """ids: the sequence so far (prompt + generated); scores: (V,) plaintext logits."""
        scores = scores.detach().to("cpu", torch.float32).reshape(1, -1)
        if len(self.processors):
            scores = self.processors(cast(torch.LongTensor, torch.tensor([list(ids)], dtype=torch.long)), scores)
        if self.params.greedy:
            return int(torch.argmax(scores, dim=-1))
        probs = torch.nn.functional.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator))


class TextAssembler:
    """Turns generated token ids into text pieces whose concatenation is the final text.

    Decodes the whole generated sequence each step (skipping special tokens) and hands out only
    text that can no longer change: it holds back the last word (detokenizers rewrite spaces
    around punctuation and merge word pieces), an incomplete UTF-8 sequence (U+FFFD), and any
    tail that could be the start of a stop string. With stop strings the text ends just before
    the first one (the stop string is not part of the output).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def _decode(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _take(self, text: str, upto: int) -> str:
        if upto <= len(self.emitted) or not text.startswith(self.emitted):
            return ""
        piece = text[len(self.emitted) : upto]
        self.emitted = text[:upto]
        return piece

    def push(self, token: int) -> str:
        """Add one token; return the text that became final (maybe ''). Sets `stopped`."""
        self.ids.append(token)
        text = self._decode()
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            cut = min(hits)
            piece = self._take(text[:cut], cut)
            self.emitted = text[:cut]
            return piece
        safe = len(text)
        while safe and text[safe - 1] == "\ufffd":
            safe -= 1
        space = max(text.rfind(" ", 0, safe), text.rfind("\n", 0, safe), text.rfind("\t", 0, safe))
        safe = max(space, 0)
        for s in self.stop:  # a tail that may grow into a stop string
            for j in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:j]):
                    safe -= j
                    break
        return self._take(text, safe)

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        if self.stopped:
            return ""
        text = self._decode()
        if not text.startswith(self.emitted):  # a detokenizer rewrote emitted text: best effort
            piece = text[len(self.emitted) :]
            self.emitted = text
            return piece
        return self._take(text, len(text))
