"""Sentence embeddings from an encoder's hidden states, as sentence-transformers computes them.

User side (P3): applied after un-permuting the hidden states P2 returns (`y = y′·πᵀ`).
Mean pooling is permutation-equivariant, so it could also run on the permuted states and be
un-permuted afterwards; the SDK un-permutes first.
"""

import torch

# sentence-transformers' Pooling modes that `pool` computes
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the real tokens: (B, S, d), mask (B, S) -> (B, d).

    Same arithmetic as sentence-transformers' `Pooling(mode="mean")`: padding positions
    (mask 0) are excluded and the count is clamped at 1e-9, so an all-padding row gives zeros.
    """
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden states {tuple(hidden.shape)}")
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, S, 1)
    total = (hidden * m).sum(dim=1)  # (B, d)
    count = m.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    return total / count


def normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise along the last axis (sentence-transformers' `Normalize`)."""
    return torch.nn.functional.normalize(x, p=2.0, dim=-1, eps=eps)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, S, d), mask (B, S) -> (B, d), as sentence-transformers' `Pooling` does in `mode`:
    "mean", "cls" (the first token), "max" or "mean_sqrt_len" (the sum over sqrt of the count)."""
    if mode == "mean":
        return mean_pool(hidden, mask)
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, -1e9).max(dim=1).values
    if mode == "mean_sqrt_len":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9).sqrt()
    raise ValueError(f"pooling mode {mode!r} is not one of {', '.join(POOLING_MODES)}")
