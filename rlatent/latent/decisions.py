"""The sampler's decision rules: which token, whether a block opens or stops, whether a row has ended.

Pure functions of a step's states and counters; the scheduler (`rlatent.latent.sampler`) calls them on the
live rows, in row order, which is the order of every random draw. Decisions are thresholded (`greedy`) or
drawn from a Bernoulli (`sample`); a decision forced by a cap (latents per block, blocks per answer, total
latents) carries no log-probability. Every log-probability comes from `rlatent.latent.policy`, the functions
the learner recomputes them with.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from rlatent.latent.policy import decision_logprobs
from rlatent.model.latent_model import LatentModel


def sample_tokens(scaled: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(N, V) logits at the sampling temperature (`policy.scaled_logits`) -> (N,) tokens: argmax at
    temperature 0, else nucleus sampling."""
    if temperature == 0:
        return scaled.argmax(-1)
    probs = torch.softmax(scaled, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        return order.gather(-1, torch.multinomial(sorted_probs, 1)).squeeze(-1)
    return torch.multinomial(probs, 1).squeeze(-1)


def _decide(logits: torch.Tensor, threshold: float, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary decisions from logits; returns (decision bool, its log-prob)."""
    if sample:
        decision = torch.bernoulli(torch.sigmoid(logits.double())).bool()
    else:
        decision = torch.sigmoid(logits) > threshold
    return decision, decision_logprobs(logits, decision)


def stop_reached(ids: torch.Tensor, active: torch.Tensor, position: torch.Tensor, prompt_lengths: torch.Tensor,
                 stops: list[torch.Tensor]) -> torch.Tensor:
    """(A,) True where the completion of row `active[i]` ends at `position[i]` with one of `stops` (token-id
    sequences; a latent slot in between breaks the match, since its id is the pad id)."""
    hit = torch.zeros_like(active, dtype=torch.bool)
    for stop in stops:
        back = torch.arange(len(stop) - 1, -1, -1, device=ids.device)
        index = position[:, None] - back[None, :]  # (A, L): the last L positions
        inside = (index >= prompt_lengths[active][:, None]).all(-1)
        hit |= inside & (ids[active[:, None], index.clamp_min(0)] == stop).all(-1)
    return hit


@dataclass
class Counters:
    """Where each slot's row stands in its answer, every field (S,) over slots (or (A,) over live rows):
    whether its last position is a latent slot, the length of its open block, and its blocks, latents and
    tokens so far. The caps are decided on them."""

    in_block: torch.Tensor  # bool
    block_length: torch.Tensor  # long, as are the rest
    blocks: torch.Tensor
    latents: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def zeros(cls, n: int, device: torch.device) -> "Counters":
        counts = (torch.zeros(n, dtype=torch.long, device=device) for _ in range(4))
        return cls(torch.zeros(n, dtype=torch.bool, device=device), *counts)

    def __getitem__(self, index: torch.Tensor) -> "Counters":
        return Counters(*(getattr(self, f.name)[index] for f in fields(self)))

    def __setitem__(self, index: torch.Tensor, value: "Counters | int") -> None:
        for f in fields(self):
            getattr(self, f.name)[index] = value if isinstance(value, int) else getattr(value, f.name)

    def after(self, go_latent: torch.Tensor) -> "Counters":
        """The counters once each row has taken its next position: a latent slot where `go_latent`, else a
        token."""
        return Counters(go_latent, torch.where(go_latent, self.block_length + 1, 0),
                        self.blocks + (go_latent & ~self.in_block).long(), self.latents + go_latent.long(),
                        self.tokens + (~go_latent).long())


class Decisions(NamedTuple):
    """The start and stop rules' verdicts for A rows: `go_latent` (A,) whether the next position is a latent
    slot; each head's log-prob (A,), 0 where it decided nothing, and where it decided freely (A,) bool."""

    go_latent: torch.Tensor
    start_logprob: torch.Tensor | None = None  # None: the mode has no slots, so nothing is decided
    start_decided: torch.Tensor | None = None
    stop_logprob: torch.Tensor | None = None
    stop_decided: torch.Tensor | None = None


@dataclass(frozen=True)
class BlockRules:
    """The start and stop rules with their thresholds and caps. `cap`: the latents in one block (the mode's
    fixed block length where it has one)."""

    cap: int
    max_blocks: int
    max_total_latents: int
    start_threshold: float
    stop_threshold: float
    sampled: bool  # Bernoulli draws (`decisions: sample`), else thresholds

    def decide(self, model: LatentModel, state: torch.Tensor, counters: Counters) -> Decisions:
        """Decisions on the (A, H) states of the rows' last positions. A row in language may open a block while
        it has blocks and latents left; a row in a block stops at `cap` latents in it or at the total cap, else
        (where the mode has stop decisions) the stop head decides. The start head draws before the stop head."""
        mode = model.latent_mode
        in_latent = counters.in_block
        if not mode.has_slots:
            return Decisions(torch.zeros_like(in_latent))
        can_open = ~in_latent & (counters.blocks < self.max_blocks) & (counters.latents < self.max_total_latents)
        opened, start_lp = _decide(model.start_logits(state), self.start_threshold, self.sampled)
        must_stop = in_latent & ((counters.block_length >= self.cap) | (counters.latents >= self.max_total_latents))
        free_stop = in_latent & ~must_stop & mode.has_stop_decisions
        stopped, stop_lp = _decide(model.stop_logits(state), self.stop_threshold, self.sampled)
        keeps_going = ~stopped if mode.has_stop_decisions else torch.ones_like(stopped)
        go_latent = (can_open & opened) | (in_latent & ~must_stop & keeps_going)
        return Decisions(go_latent, torch.where(can_open, start_lp, 0.0), can_open,
                         torch.where(free_stop, stop_lp, 0.0), free_stop)
