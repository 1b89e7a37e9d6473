"""Projections from a last-layer hidden state to the next latent input.

Chosen by name (`latent.proj`). Last-layer states of pretrained LMs have norms
tens of times larger than input embeddings, so feeding them back unchanged
(Coconut's `identity`) puts the latent far outside the input distribution;
`norm_match` rescales each state to the mean token-embedding norm, and `mlp`
learns a residual correction on top of `norm_match`, starting exactly at it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Identity(nn.Module):
    """z = h (Coconut)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class NormMatch(nn.Module):
    """z = h / |h| * mean |e|: the direction of h at the scale of token embeddings."""

    def __init__(self, target_norm: float):
        super().__init__()
        self.register_buffer("target_norm", torch.tensor(float(target_norm)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = hidden.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return hidden / norm * self.target_norm.to(hidden.dtype)


class ResidualMLP(nn.Module):
    """z = norm_match(h + W2 gelu(W1 h)); W2 starts at zero so training starts from `norm_match`."""

    def __init__(self, hidden_size: int, target_norm: float):
        super().__init__()
        self.up = nn.Linear(hidden_size, hidden_size)
        self.down = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        self.norm_match = NormMatch(target_norm)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm_match(hidden + self.down(nn.functional.gelu(self.up(hidden))))


PROJECTIONS: dict[str, Callable[[int, float], nn.Module]] = {
    "identity": lambda hidden_size, target_norm: Identity(),
    "norm_match": lambda hidden_size, target_norm: NormMatch(target_norm),
    "mlp": ResidualMLP,
}


def build_projection(name: str, hidden_size: int, target_norm: float) -> nn.Module:
    return PROJECTIONS[name](hidden_size, target_norm)
