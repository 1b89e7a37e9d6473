"""Start and stop classifier heads.

A head maps a hidden state (..., H) to one logit (...,). The start head reads
language positions ("open a block after this position"), the stop head reads
latent slots ("this latent closes the block"). The bias starts at the log-odds
of a prior rate so the first steps do not spend themselves learning that
starts are rare.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Head(nn.Module):
    def __init__(self, hidden_size: int, kind: str, prior: float):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(hidden_size, 1)
        else:
            self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, 1))
        last = self.net if kind == "linear" else self.net[-1]
        nn.init.normal_(last.weight, std=0.02 / math.sqrt(hidden_size))
        nn.init.constant_(last.bias, math.log(prior / (1.0 - prior)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...,) logits."""
        return self.net(hidden).squeeze(-1)
