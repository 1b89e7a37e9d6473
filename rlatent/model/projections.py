"""Projections from a last-layer hidden state to the next latent input.

Chosen by name (`latent.proj`). Last-layer states of pretrained LMs have norms
tens of times larger than input embeddings, so feeding them back unchanged
(Coconut's `identity`) puts the latent far outside the input distribution;
`norm_match` rescales each state to the mean token-embedding norm, and `mlp`
learns a residual correction on top of `norm_match`, starting exactly at it.

A raw last-layer state fed back as a first-layer input is the suspected cause
of latents being ignored, so two projections keep the latent on the embedding
manifold, as the latent-RL systems that gained from RL do: `soft` is the
probability-weighted mixture of the top-k token embeddings (Soft Thinking,
Latent-GRPO), `gated` a learned gate between the projected state and the greedy
token's embedding (HRPO). Both are deterministic functions of the state, so the
sampler and the training forward compute them alike, and exploration noise
around them has the usual Gaussian density.

On the arithmetic ladder a learned constant (the pause control) gets a step
right more often than the fed-back state. `pause_plus` starts a latent exactly
where the pause control starts, a learned vector at the mean token embedding,
and lets the state in only through a zero-initialised linear map: the latent
row begins as the pause row and can depart from it only where the state helps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TokenSpace:
    """What the embedding-manifold projections read from the model: the LM head's logits of a state and the
    input embeddings of token ids (callables, so the projection owns no copy of the model's weights)."""

    logits: Callable[[torch.Tensor], torch.Tensor]  # (..., H) -> (..., V)
    embed: Callable[[torch.Tensor], torch.Tensor]  # (...) ids -> (..., H)
    mean: torch.Tensor  # (H,) the mean input embedding, where the pause control's embeddings start


class SoftTokens(nn.Module):
    """z = sum over the top-k tokens of softmax(logits / T) * their embeddings (Soft Thinking, Latent-GRPO).

    Renormalised over the top k (a full-vocabulary mixture would cost a (V, H) matmul per latent and be
    dominated by the tail). No parameters of its own: the gradient reaches the trunk and LM-head adapters
    through the weights. An audit found one system's "soft" actions effectively one-hot (median max weight
    0.9999989); phase 1 logs that number for these latents (`soft_max_weight`, `rlatent.sft.diagnostics.latent_norms`).
    """

    reads_logits = True
    """`forward` takes the LM head's logits of `hidden` when the caller already has them (`LatentModel.latent_inputs`)."""

    def __init__(self, tokens: TokenSpace, top_k: int, temperature: float):
        super().__init__()
        self.tokens, self.top_k, self.temperature = tokens, top_k, temperature

    def top_tokens(self, hidden: torch.Tensor, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., H) -> the mixture's weights (..., k) and token ids (..., k)."""
        top = (self.tokens.logits(hidden) if logits is None else logits).topk(self.top_k, dim=-1)
        return torch.softmax(top.values.to(hidden.dtype) / self.temperature, dim=-1), top.indices

    def forward(self, hidden: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        weights, ids = self.top_tokens(hidden, logits)
        return (weights[..., None] * self.tokens.embed(ids).to(hidden.dtype)).sum(-2)


class GatedToken(nn.Module):
    """z = g * e(argmax token) + (1 - g) * norm_match(h), g = sigmoid(W h + b) per dimension (HRPO's gate).

    W starts at zero and b at log 9, so a fresh model feeds back 90 % of the greedy token's embedding (on
    the manifold) and learns how much of the state to let through.
    """

    reads_logits = True
    """As `SoftTokens.reads_logits`."""

    def __init__(self, tokens: TokenSpace, hidden_size: int, target_norm: float):
        super().__init__()
        self.tokens = tokens
        self.gate = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, math.log(9.0))
        self.norm_match = NormMatch(target_norm)

    def forward(self, hidden: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.tokens.logits(hidden) if logits is None else logits
        token = self.tokens.embed(logits.argmax(-1)).to(hidden.dtype)
        gate = torch.sigmoid(self.gate(hidden))
        return gate * token + (1 - gate) * self.norm_match(hidden)


class PausePlusState(nn.Module):
    """z = c + W norm_match(h): a learned vector c (initialised at the mean token embedding, as the pause
    control's embeddings are) plus a linear read of the state, W initialised at zero.

    At initialisation every latent input is c, the pause control's input, whatever the state; W's gradient
    is not zero (it is the input gradient times the state), so training lets the state in only as far as it
    lowers the loss (phase 1 logs how far it has: `latent_state_share`, `rlatent.sft.diagnostics.latent_norms`).
    """

    def __init__(self, tokens: TokenSpace, hidden_size: int, target_norm: float):
        super().__init__()
        self.constant = nn.Parameter(tokens.mean.detach().clone())
        self.read = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.read.weight)
        self.norm_match = NormMatch(target_norm)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.constant.to(hidden.dtype) + self.read(self.norm_match(hidden))


PROJECTIONS: dict[str, Callable[..., nn.Module]] = {
    "identity": lambda hidden_size, target_norm, tokens, settings: Identity(),
    "norm_match": lambda hidden_size, target_norm, tokens, settings: NormMatch(target_norm),
    "mlp": lambda hidden_size, target_norm, tokens, settings: ResidualMLP(hidden_size, target_norm),
    "soft": lambda hidden_size, target_norm, tokens, settings: SoftTokens(tokens, settings.soft_top_k,
                                                                          settings.soft_temperature),
    "gated": lambda hidden_size, target_norm, tokens, settings: GatedToken(tokens, hidden_size, target_norm),
    "pause_plus": lambda hidden_size, target_norm, tokens, settings: PausePlusState(tokens, hidden_size,
                                                                                    target_norm),
}
"""`latent.proj` name -> builder (hidden size, mean embedding norm, `TokenSpace`, latent settings)."""


def build_projection(name: str, hidden_size: int, target_norm: float, tokens: TokenSpace, settings) -> nn.Module:
    return PROJECTIONS[name](hidden_size, target_norm, tokens, settings)
