"""Helpers shared by the tests: randomised stock models and comparison utilities."""

import torch
from torch import nn


@torch.no_grad()
def randomize_parameters(model: nn.Module, scale: float = 0.5, seed: int = 0) -> nn.Module:
    """Give EVERY parameter random values, norm weights and biases included.

    Freshly initialised norms (ones, zero bias) hide the most common transform bug, so the
    tests never use them. Norm weights are drawn around 1 so activations stay of order 1.
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
