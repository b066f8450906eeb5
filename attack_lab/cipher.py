"""Attack 4: frequency analysis of the token substitution cipher.

With a tied head (attack 3) or from repeated rows alone, P2 turns every input row into a
symbol `j` = argsort(π_c)[t]: a fixed relabelling of the token t. What P2 holds is the stream
of symbols; what it knows is public statistics of the language over the tokenizer's
vocabulary (`attack_lab.corpus`). Two steps:

1. frequency ranking: the i-th most frequent symbol is guessed to be the i-th most frequent
   token of the public statistics;
2. bigram refinement (when the statistics have bigrams): hill climbing on the likelihood of
   the observed symbol bigrams under the public bigram model, for the 100, then the 300 most
   frequent symbols (`refine`).

Scored by occurrence: the fraction of the stream's tokens whose symbol maps to the true token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attack_lab.corpus import LanguageStats


@dataclass(frozen=True)
class CipherResult:
    tokens_seen: int
    rank_only: float  # fraction of occurrences recovered by frequency ranking alone
    refined: float | None  # after bigram refinement (None: the statistics have no bigrams)


def rank_mapping(symbols: np.ndarray, stats: LanguageStats, n_symbols: int) -> np.ndarray:
    """symbol -> guessed token, by frequency rank (unseen symbols -> -1)."""
    counts = np.bincount(symbols, minlength=n_symbols)
    seen = np.flatnonzero(counts)
    order = seen[np.argsort(-counts[seen], kind="stable")]
    plain_order = np.argsort(-stats.unigram, kind="stable")
    guess = np.full(n_symbols, -1, dtype=np.int64)
    guess[order] = plain_order[: len(order)]
    return guess


def refine(
    symbols: np.ndarray,
    guess: np.ndarray,
    stats: LanguageStats,
    *,
    stages: tuple[int, ...] = (100, 300),
    sweeps: int = 3,
    alpha: float = 1.0,
) -> np.ndarray:
    """Bigram refinement of `guess` by hill climbing, from the most frequent symbols outwards.

    Stage K maps the K most frequent symbols into the 2K most frequent tokens (everything else
    is one class, "other") and maximises the log-likelihood of the observed symbol bigrams
    under the public bigram model plus a Poisson term for each symbol's count: each symbol in
    turn moves to (or swaps with) the token that raises it most. Every accepted move raises
    the likelihood, so the climb cannot oscillate.
    """
    if stats.bigram is None:
        raise ValueError(f"{stats.name} has no bigram statistics")
    n = len(guess)
    counts = np.bincount(symbols, minlength=n)
    seen = np.flatnonzero(counts)
    by_count = seen[np.argsort(-counts[seen], kind="stable")]
    plain_order = np.argsort(-stats.unigram, kind="stable")
    uni = stats.unigram / stats.unigram.sum()
    pairs = np.array(list(stats.bigram.keys()), dtype=np.int64).reshape(-1, 2)
    weights = np.array(list(stats.bigram.values()), dtype=np.float64)
    guess = guess.copy()
    for k in stages:
        top = by_count[:k]
        plain = plain_order[: 2 * len(top)]
        n_p = len(plain)
        # classes: 0..n_p-1 the candidate tokens, n_p "other"
        p_index = np.full(n, n_p)
        p_index[plain] = np.arange(n_p)
        big = np.zeros((n_p + 1, n_p + 1))
        np.add.at(big, (p_index[pairs[:, 0]], p_index[pairs[:, 1]]), weights)
        u = np.append(uni[plain], max(1.0 - uni[plain].sum(), 1e-12))
        log_p = np.log((big + alpha * u[None, :]) / (big.sum(1, keepdims=True) + alpha))  # log P(right | left)
        # observed bigrams among the stage's symbols (last index: every other symbol)
        s_index = np.full(n, len(top))
        s_index[top] = np.arange(len(top))
        c = np.zeros((len(top) + 1, len(top) + 1))
        np.add.at(c, (s_index[symbols[:-1]], s_index[symbols[1:]]), 1.0)
        expected = len(symbols) * u[:n_p]
        uni_score = counts[top][:, None] * np.log(expected + 1e-12)[None, :] - expected[None, :]  # (K, n_p)
        # current mapping: symbol row -> class; a symbol whose guess is outside the candidates gets a free one
        m = np.append(p_index[np.where(guess[top] >= 0, guess[top], 0)], n_p)
        m[:-1][guess[top] < 0] = n_p
        owner = np.full(n_p + 1, -1)
        for i, cls in enumerate(m[:-1]):
            if cls < n_p and owner[cls] < 0:
                owner[cls] = i
            else:
                m[i] = n_p
        free = [q for q in range(n_p) if owner[q] < 0]
        for row in np.flatnonzero(m[:-1] == n_p).tolist():
            m[row] = free.pop(0)
            owner[m[row]] = row

        right_of = np.ascontiguousarray(log_p[:n_p][:, m])  # [q, j] = log P(class of j | q)
        left_of = np.ascontiguousarray(log_p[m][:, :n_p].T)  # [q, j] = log P(q | class of j)
        for _ in range(sweeps):
            moved = 0
            for i in range(len(top)):
                cur = m[i]
                gain = right_of @ c[i] + left_of @ c[:, i] + uni_score[i]  # i alone -> q
                for q in np.argsort(-gain)[:4]:
                    if q == cur:
                        break
                    o = owner[q]
                    idx = [i] if o < 0 else [i, int(o)]
                    before = _local(idx, m, c, log_p, uni_score)
                    trial = m.copy()
                    trial[i] = q
                    if o >= 0:
                        trial[o] = cur
                    if _local(idx, trial, c, log_p, uni_score) > before + 1e-9:
                        m = trial
                        owner[q], owner[cur] = i, o
                        for j in idx:
                            right_of[:, j] = log_p[:n_p, m[j]]
                            left_of[:, j] = log_p[m[j], :n_p]
                        moved += 1
                        break
            if not moved:
                break
        guess[guess >= 0] = np.where(np.isin(guess[guess >= 0], plain), -1, guess[guess >= 0])
        guess[top] = plain[m[:-1]]
    return guess


def _local(idx: list[int], m: np.ndarray, c: np.ndarray, log_p: np.ndarray, uni_score: np.ndarray) -> float:
    """The part of the refinement's objective that involves the symbol rows in `idx` under mapping `m`."""
    total = 0.0
    for s in idx:
        total += float(c[s] @ log_p[m[s], m]) + float(c[:, s] @ log_p[m, m[s]]) + float(uni_score[s, m[s]])
    for s in idx:
        for t in idx:
            total -= float(c[s, t] * log_p[m[s], m[t]])  # counted twice above
    return total


def recovered(symbols: np.ndarray, guess: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of occurrences whose symbol is mapped to its true token (`truth[symbol]`)."""
    return float(np.mean(guess[symbols] == truth[symbols]))


def frequency_analysis(
    tokens: np.ndarray, pi_c: np.ndarray, stats: LanguageStats, *, refine_: bool = True
) -> CipherResult:
    """P2's view of `tokens` under π_c is the symbol stream argsort(π_c)[tokens]; `pi_c` is the
    truth (symbol j is token pi_c[j]) and serves only to score the attack."""
    symbols = np.argsort(pi_c)[tokens]
    guess = rank_mapping(symbols, stats, len(pi_c))
    rank = recovered(symbols, guess, pi_c)
    refined = None
    if stats.bigram is not None and refine_:
        refined = recovered(symbols, refine(symbols, guess, stats), pi_c)
    return CipherResult(len(tokens), rank, refined)
