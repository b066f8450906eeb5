"""Helpers shared by the tests: randomised stock models and comparison utilities."""

from dataclasses import replace

import torch
from torch import nn

from shared.keys import DeveloperKey, LayerKey, ModelDims, draw_key
from shared.permutation import random_permutation


@torch.no_grad()
def randomize_parameters(model: nn.Module, scale: float = 0.25, seed: int = 0) -> nn.Module:
    """Give EVERY parameter random values, norm weights and biases included.

    Freshly initialised norms (ones, zero bias) hide the most common transform bug, so the
    tests never use them. Norm weights are drawn around 1 and the default scale keeps the tiny
    test models' outputs of order 1 (std about 2), which is what the fp32 bound TOL assumes:
    at scale 0.5 logits reach 12 and fp32 rounding alone comes within 2x of TOL. Every exactness
    test in the suite passes at TOL / 4 with this default.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "norm" in name.lower() and name.endswith("weight"):
            p.copy_(1.0 + 0.5 * noise)
        else:
            p.copy_(scale * noise)
    return model.eval()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


TOL = 1e-4  # fp32 exactness bound on outputs of order 1 (PROTOCOL.md section 2)


def assert_close(ref: torch.Tensor, got: torch.Tensor) -> None:
    assert torch.isfinite(got).all()
    assert 0.5 < float(ref.abs().max()) < 50  # logits of order 1-10: the tolerance means something
    delta = max_abs_diff(ref, got)
    assert delta <= TOL, f"max |Δ| = {delta:.3g}"


def left_padded(batch: int, seq: int, vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, S) and a mask with row b padded on the left by b tokens (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(batch):
        mask[b, :b] = 0
        ids[b, :b] = 0
    return ids, mask


def generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """What generate() passes as position_ids for a padded batch: real tokens count from 0."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def nonidentity(n: int) -> torch.Tensor:
    while True:
        p = random_permutation(n)
        if not torch.equal(p, torch.arange(n)):
            return p


def nonidentity_key(dims: ModelDims) -> DeveloperKey:
    """A valid key where every permutation, inner ones included, moves something.

    GQA groups are respected; the within-head Q/K permutation exists only without RoPE.
    """
    g = dims.group_size
    layers = []
    for _ in range(dims.n_layers):
        kv_head = nonidentity(dims.n_kv_heads)
        head = torch.cat(
            [
                kv_head[c] * g + (nonidentity(g) if g > 1 else torch.zeros(1, dtype=torch.int64))
                for c in range(dims.n_kv_heads)
            ]
        )
        qk = None if dims.rope else torch.stack([nonidentity(dims.head_dim) for _ in range(dims.n_kv_heads)])
        v = torch.stack([nonidentity(dims.head_dim) for _ in range(dims.n_kv_heads)])
        layers.append(LayerKey(kv_head=kv_head, head=head, qk=qk, v=v, ffn=nonidentity(dims.d_ff)))
    key = draw_key(dims)
    user = replace(key.user, pi=nonidentity(dims.d_model), pi_c=nonidentity(dims.d_out))
    return DeveloperKey(user=user, dims=dims, layers=tuple(layers))
