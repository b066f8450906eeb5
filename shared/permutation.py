"""Permutations as index vectors.

Convention (PROTOCOL.md section 2): a permutation of size n is an int64 vector `p`, a
permutation of 0..n-1, and `x·π = x[..., p]`. Its inverse is `argsort(p)`.
"""

import secrets

import torch

_rng = secrets.SystemRandom()


def random_permutation(n: int) -> torch.Tensor:
    """A uniformly random permutation of 0..n-1 drawn from the OS CSPRNG (never seeded)."""
    order = list(range(n))
    _rng.shuffle(order)
    return torch.tensor(order, dtype=torch.int64)


def inverse(p: torch.Tensor) -> torch.Tensor:
    return torch.argsort(p)


def is_permutation(p: torch.Tensor, n: int | None = None) -> bool:
    if p.dim() != 1 or p.dtype != torch.int64:
        return False
    if n is not None and p.numel() != n:
        return False
    return bool(torch.equal(torch.sort(p).values, torch.arange(p.numel())))


def permute(x: torch.Tensor, p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x·π along `dim` (user side: apply π before sending)."""
    return x.index_select(dim, p.to(x.device))


def unpermute(y: torch.Tensor, p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """y·πᵀ along `dim` (user side: undo π on what comes back)."""
    return y.index_select(dim, inverse(p).to(y.device))
