"""Attack 2: generation linking, from P2's traffic alone (no public knowledge, any head).

During a generation P2 returns the next token's π_c-index (greedy: `output=topk&k=1`) or a
set of candidates (top-k sampling: `output=topk&k=K`), and the next request of the session carries
that token's row x·π. Rows of a token are the same bytes every time (no position is added for
RoPE families), so P2 builds a dictionary row -> π_c-index: greedy at once; sampled by
intersecting, over each row's appearances, the set of indices P2 ranked in its top `k`. The
dictionary then labels every later input row of those tokens, in prompts too: the same
substitution cipher as the tied head (attack 3), untied heads included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from attack_lab.scenario import Deployment
from shared.permutation import permute


@dataclass
class Traffic:
    """What P2 records, per session: the rows of each request and what it answered (indices)."""

    rows: list[list[torch.Tensor]] = field(default_factory=list)  # [session][step] (S, d) x·π
    answers: list[list[torch.Tensor]] = field(default_factory=list)  # [session][step] candidate indices
    tokens: list[list[torch.Tensor]] = field(default_factory=list)  # truth: the tokens of the rows (scoring only)


@torch.no_grad()
def simulate_generations(
    dep: Deployment,
    prompts: list[list[int]],
    new_tokens: int,
    *,
    temperature: float = 0.0,
    top: int = 50,
    seed: int = 0,
) -> Traffic:
    """P3 generates from each prompt through the protocol, P2 running θ′ in the stock class.

    Greedy: P2 answers the arg-max index (what the SDK asks for, `output=topk&k=1`). Sampling
    (temperature > 0) with top-k filtering: P2 answers the `top` indices and values
    (`output=topk&k=top`) and P3 samples among them.
    """
    model = dep.family.build_cloud_model(dep.config).eval()
    model.load_state_dict(dep.cloud, strict=False)
    g = torch.Generator().manual_seed(seed)
    traffic = Traffic()
    for prompt in prompts:
        rows, answers, toks = [], [], []
        ids, cache = torch.tensor(prompt), None
        for _ in range(new_tokens):
            x_pi = permute(dep.family.embed(dep.user, dep.config, ids[None]), dep.key.pi)  # P3 -> P2
            out = dep.family.cloud_forward(model, x_pi, None, cache, last_only=True)  # P2
            cache, logits_pi = out.cache, out.output[0, -1]
            rows.append(x_pi[0])
            toks.append(ids)
            best = logits_pi.topk(1 if temperature == 0 else top)
            answers.append(best.indices)  # what P2 answered
            tokens = dep.key.pi_c[best.indices]  # P3: the token of index j is pi_c[j]
            if temperature == 0:
                nxt = int(tokens[0])
            else:
                pick = torch.multinomial(torch.softmax(best.values / temperature, -1), 1, generator=g)
                nxt = int(tokens[pick])
            ids = torch.tensor([nxt])
        traffic.rows.append(rows)
        traffic.answers.append(answers)
        traffic.tokens.append(toks)
    return traffic


def _key(row: torch.Tensor) -> bytes:
    return row.contiguous().numpy().tobytes()


def build_dictionary(traffic: Traffic, sessions: range) -> dict[bytes, int]:
    """P2's dictionary row bytes -> π_c-index, from consecutive requests of each session."""
    candidates: dict[bytes, set[int]] = {}
    for s in sessions:
        rows, answers = traffic.rows[s], traffic.answers[s]
        for step in range(1, len(rows)):
            if rows[step].shape[0] != 1:
                continue
            k = _key(rows[step][0])
            seen = set(answers[step - 1].tolist())
            candidates[k] = candidates[k] & seen if k in candidates else seen
    return {k: next(iter(v)) for k, v in candidates.items() if len(v) == 1}


@dataclass(frozen=True)
class LinkScore:
    dictionary: int  # rows labelled
    correct: float  # fraction of the dictionary's labels that are the true π_c-index
    labelled: float  # fraction of the scored prompt rows the dictionary labels


def score_dictionary(
    dictionary: dict[bytes, int], traffic: Traffic, learned: range, scored: range, pi_c: torch.Tensor
) -> LinkScore:
    """Check every label against the truth (rows of `learned`), and label the prompt rows (first
    request) of the sessions in `scored`."""
    inverse = torch.argsort(pi_c)
    truth: dict[bytes, int] = {}
    for s in learned:
        for rows, toks in zip(traffic.rows[s], traffic.tokens[s], strict=True):
            for row, tok in zip(rows, toks.tolist(), strict=True):
                truth[_key(row)] = int(inverse[tok])
    right = sum(int(truth.get(k) == label) for k, label in dictionary.items())
    hits = total = 0
    for s in scored:
        for row in traffic.rows[s][0]:
            total += 1
            hits += int(_key(row) in dictionary)
    return LinkScore(len(dictionary), right / max(len(dictionary), 1), hits / max(total, 1))


def english_coverage(stream: np.ndarray, seen: int, window: int = 10000) -> float:
    """If the generations were this English stream: the fraction of the next `window` tokens
    whose token occurred in the first `seen` (what a dictionary learned from `seen` generated
    tokens would label)."""
    known = np.zeros(int(stream.max()) + 1, dtype=bool)
    known[stream[:seen]] = True
    return float(known[stream[seen : seen + window]].mean())
