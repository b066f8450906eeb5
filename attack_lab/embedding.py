"""Attacks 1 and 3: recovering input tokens from single rows of x·π.

1. Embedding matching (public base model known): a permutation moves a row's values, it does
   not change them, so the sorted row of x·π equals the sorted row of the token's embedding;
   P2 matches against the public table sorted the same way. For BERT-style encoders the row P3
   sends is LayerNorm(word + position + token type); P2 knows the position of each row in its
   request and builds that candidate table per position from the public embedding module.
3. Tied-head lookup (no public knowledge): with a tied head θ′ holds πᵀ E π_c, whose row j is
   E[π_c[j]]·π, exactly the row P3 sends for token π_c[j]: an exact match gives the π_c-index
   of every input token (a substitution cipher, attack 4).

Also measured: an orthogonal rotation instead of a permutation (not an exact STIP transform:
the norms would not commute with it) keeps row norms, and norm matching alone then finds tokens.
"""

from __future__ import annotations

import torch

_CHUNK = 4096


def nearest_rows(queries: torch.Tensor, table: torch.Tensor, *, candidates: int = 8) -> torch.Tensor:
    """Index of the nearest (L2) row of `table` (V, f) for each query (n, f).

    A k-d tree on a random 8-dimensional projection proposes `candidates` rows per query (a
    projection keeps distances roughly, and a k-d tree is fast in few dimensions), the exact
    distance picks among them; a small table is searched exhaustively.
    """
    from scipy.spatial import cKDTree

    table, queries = table.float(), queries.float()
    if len(table) <= 4096 or table.shape[1] <= 8:
        return torch.cdist(queries, table).argmin(1)
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(table.shape[1], 8, generator=g) / table.shape[1] ** 0.5
    _, idx = cKDTree((table @ proj).numpy()).query((queries @ proj).numpy(), k=candidates)
    short = torch.as_tensor(idx, dtype=torch.long)  # (n, candidates)
    dist = (table[short] - queries[:, None, :]).pow(2).sum(-1)
    return short.gather(1, dist.argmin(1, keepdim=True))[:, 0]


def sorted_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.sort(x.float(), dim=-1).values


def match_embedding_rows(x_pi: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Attack 1, decoder inputs: rows E[t]·π (n, d) against the public token table (V, d) -> t guesses."""
    return shortlist_match(x_pi, table)


def match_bert_rows(x_pi: torch.Tensor, public_embedding: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """Attack 1, encoder inputs: x·π (B, S, d), each row LayerNorm(word + position[s] + type[0])
    permuted; the public embedding module gives the candidate table of each position s -> (B, S) guesses.

    Per position, a shortlist by permutation-invariant power sums (Σx^k, k = 1..6), then the
    sorted-row match among the shortlist (sorting the whole table per position is slower).
    """
    word = public_embedding["embeddings.word_embeddings.weight"].float()
    pos = public_embedding["embeddings.position_embeddings.weight"].float()
    typ = public_embedding["embeddings.token_type_embeddings.weight"].float()
    ln_w = public_embedding["embeddings.LayerNorm.weight"].float()
    ln_b = public_embedding["embeddings.LayerNorm.bias"].float()
    eps = float(config.get("layer_norm_eps", 1e-12))
    guesses = torch.empty(x_pi.shape[:2], dtype=torch.long)
    for s in range(x_pi.shape[1]):
        candidates = torch.nn.functional.layer_norm(word + pos[s] + typ[0], (word.shape[1],), ln_w, ln_b, eps)
        guesses[:, s] = shortlist_match(x_pi[:, s], candidates)
    return guesses


def power_sums(x: torch.Tensor, k: int = 6) -> torch.Tensor:
    """(n, d) -> (n, k): mean_i x_i^p for p = 1..k, each taken to the 1/p power (same scale as x)."""
    x = x.float()
    out, acc = [], torch.ones_like(x)
    for p in range(1, k + 1):
        acc = acc * x
        m = acc.mean(1)
        out.append(m.sign() * m.abs() ** (1.0 / p))
    return torch.stack(out, 1)


def shortlist_match(rows_pi: torch.Tensor, table: torch.Tensor, shortlist: int = 64) -> torch.Tensor:
    """Rows permuted by an unknown π (n, d) -> index of the table row (V, d) with the same values."""
    coarse = power_sums(table)
    near = []
    for q in power_sums(rows_pi).split(_CHUNK):
        near.append(torch.cdist(q, coarse).topk(min(shortlist, len(table)), largest=False).indices)
    short = torch.cat(near)  # (n, shortlist)
    cand = sorted_rows(table[short])  # (n, shortlist, d)
    dist = (cand - sorted_rows(rows_pi)[:, None, :]).pow(2).sum(-1)
    return short.gather(1, dist.argmin(1, keepdim=True))[:, 0]


def tied_head_lookup(x_pi: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Attack 3: rows x·π (n, d) against P2's own output head θ′["lm_head.weight"] (V, d) -> π_c-indices."""
    return nearest_rows(x_pi, head)


def norm_matching(x_rotated: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rows x·Q for an orthogonal Q: ‖x·Q‖ = ‖x‖; the nearest row norm of the public table -> t guesses."""
    norms = table.double().norm(dim=1)
    order = torch.argsort(norms)
    sorted_norms = norms[order]
    q = x_rotated.double().norm(dim=1)
    pos = torch.searchsorted(sorted_norms, q).clamp(1, len(order) - 1)
    left, right = sorted_norms[pos - 1], sorted_norms[pos]
    pick = torch.where((q - left).abs() <= (right - q).abs(), pos - 1, pos)
    return order[pick]


def random_orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()
