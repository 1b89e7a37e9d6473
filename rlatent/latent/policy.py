"""The policy's log-probabilities: the one home of every action's formula.

The sampler (`rlatent.latent.sampler`) calls these functions while it
generates, and the learner calls them through `recompute_actions` while it
trains, so the log-prob a trajectory was sampled with and the one the update
recomputes are the same formula on the same inputs. The float64 invariant
tests (`tests/test_invariant.py`) check that the inputs agree too.

- token at temperature T: `chosen_logprobs` (log-softmax of logits / T at the
  chosen token, as l[token] / T - logsumexp(l / T)). The learner computes it
  with `token_actions`, over chunks of rows, each chunk's logits recomputed in
  the backward instead of kept: a (N, V) logits tensor is gigabytes with a
  151k vocabulary (TRL issue 3678), and without this the update held two;
- start / stop decision: `decision_logprobs` (log-sigmoid of ±logit);
- latent with exploration noise: `gaussian_logprob` (isotropic Gaussian
  around the latent's mean).

Recomputing with gradient: without exploration noise and with
`gradient="recurrent"` the latents are recomputed with the current weights
through the recurrence (exact). With noise the sampled latents are actions:
they are fed back as stored and the gradient reaches their mean through the
log-density (the score function), as for any sampled action; `detached` also
feeds the stored latents, without that density term when there is no noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rlatent.latent.batch import LatentBatch
from rlatent.latent.forward import forward
from rlatent.latent.trajectory import Actions
from rlatent.model.latent_model import LatentModel

LOGIT_CHUNK_ROWS = 256
"""Rows of (N, V) logits computed at once in the learner: bounds the logits and their float32
temporaries to 256 x V."""


def precise_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-probs are taken in at least float32 (bf16 logits lose the small probabilities)."""
    return torch.promote_types(dtype, torch.float32)


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, V) logits -> logits / T in at least float32: what every token log-prob is a log-softmax of."""
    return logits.to(precise_dtype(logits.dtype)) / temperature


def chosen_logprobs(scaled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(N, V) logits / T (`scaled_logits`), (N,) chosen tokens -> (N,) log-prob of each token."""
    return scaled.gather(1, tokens[:, None])[:, 0] - scaled.logsumexp(-1)


def token_actions(model: LatentModel, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H) states before each token, (N,) tokens -> (N,) log-probs at temperature T (with gradient) and (N,)
    entropies (without), `LOGIT_CHUNK_ROWS` rows at a time. With gradient, each chunk's LM head runs
    under activation checkpointing: only the (chunk, H) states are kept and the (chunk, V) logits are
    recomputed in the backward, one extra LM-head matmul for a (V / H)-fold smaller footprint."""
    logprobs, entropies = [], []
    for states, chosen in zip(hidden.split(LOGIT_CHUNK_ROWS), tokens.split(LOGIT_CHUNK_ROWS)):
        if torch.is_grad_enabled() and states.requires_grad:
            logprob, entropy = checkpoint(_token_chunk, model, states, chosen, temperature, use_reentrant=False)
        else:
            logprob, entropy = _token_chunk(model, states, chosen, temperature)
        logprobs.append(logprob)
        entropies.append(entropy)
    if not logprobs:
        empty = hidden.new_zeros(0, dtype=precise_dtype(hidden.dtype))
        return empty, empty
    return torch.cat(logprobs), torch.cat(entropies)


def _token_chunk(model: LatentModel, states: torch.Tensor, tokens: torch.Tensor, temperature: float):
    scaled = scaled_logits(model.token_logits(states), temperature)
    with torch.no_grad():
        log_probs = scaled - scaled.logsumexp(-1, keepdim=True)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return chosen_logprobs(scaled, tokens), entropy


def decision_logprobs(logits: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """Log-prob of a Bernoulli decision with P(yes) = sigmoid(logit): log sigmoid(±logit), same shape."""
    logits = logits.to(precise_dtype(logits.dtype))
    return F.logsigmoid(torch.where(taken, logits, -logits))


def gaussian_logprob(sample: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Log-density of `sample` under N(mean, std^2 I), summed over the last dim: (..., H) -> (...).

    Taken in float64: with H in the hundreds the density is a sum of hundreds of
    terms, and float32 rounding alone would move importance ratios by ~1e-3."""
    dims = sample.shape[-1]
    squared = (sample.double() - mean.double()).pow(2).sum(-1)
    return -squared / (2 * std**2) - dims * (math.log(std) + 0.5 * math.log(2 * math.pi))


def bernoulli_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(Bern(sigmoid(logits)) || Bern(sigmoid(ref_logits))), exact, elementwise: a decision has two
    outcomes, so its KL needs no estimator."""
    logits, ref_logits = logits.to(precise_dtype(logits.dtype)), ref_logits.to(precise_dtype(logits.dtype))
    p = torch.sigmoid(logits)
    return (p * (F.logsigmoid(logits) - F.logsigmoid(ref_logits))
            + (1 - p) * (F.logsigmoid(-logits) - F.logsigmoid(-ref_logits)))


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: float) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)) = |mean - ref_mean|^2 / (2 std^2): (..., H) -> (...)."""
    return (mean.double() - ref_mean.double()).pow(2).sum(-1) / (2 * std**2)


@dataclass
class PolicyOutput:
    """What the policy computes on a batch of trajectories: the log-prob of every stored action, and the
    distribution parameters that KL terms compare with a reference policy's."""

    actions: Actions  # (B, T, K)
    entropy: torch.Tensor  # (N,) token entropies at the sampling temperature, no grad
    start_logits: torch.Tensor | None  # (B, T), when decisions are actions
    stop_logits: torch.Tensor | None  # (B, T)
    latent_means: torch.Tensor | None  # (B, T, H) mean of each slot's latent, when latents are actions

    def select(self, rows: torch.Tensor, width: int) -> "PolicyOutput":
        """`rows` at their first `width` positions, for the KL (token entropies, flat over all rows' tokens,
        are not carried). As `recompute_actions` on those rows: no parameters of a kind they do not hold."""
        actions = self.actions.select(rows, width)
        decisions, latents = actions.mask[..., 1:3].any(), actions.mask[..., 3].any()
        pick = lambda t, kept: None if t is None or not kept else t[rows, :width]  # noqa: E731
        return PolicyOutput(actions, self.entropy.new_zeros(0), pick(self.start_logits, decisions),
                            pick(self.stop_logits, decisions), pick(self.latent_means, latents))


def recompute_actions(model: LatentModel, batch: LatentBatch, slot_inputs: torch.Tensor, mask: torch.Tensor,
                      temperature: float, latent_noise_std: float, gradient: str,
                      pass_cost: float | None = None) -> PolicyOutput:
    """Log-probs of the stored actions under the current weights, with what the KL terms need.

    `mask` (B, T, K) says which actions exist (`Trajectories.actions`); kinds
    whose mask is empty are not computed (the reference pass of the tokens
    alone skips the heads).
    """
    fixed_latents = latent_noise_std > 0 or gradient == "detached"
    out = forward(model, batch, gradient, slot_inputs=slot_inputs if fixed_latents else None, pass_cost=pass_cost)
    hidden = out.hidden  # (B, T, H)
    rows, length = batch.input_ids.shape
    precise = precise_dtype(hidden.dtype)
    targets = mask[..., 0]
    token = torch.zeros(rows, length, dtype=precise, device=hidden.device)
    # Position t-1 predicts the token at t.
    token[targets], entropy = token_actions(model, hidden[:, :-1][targets[:, 1:]], batch.input_ids[targets],
                                            temperature)

    start = stop = latent = torch.zeros_like(token)
    start_logits = stop_logits = means = None
    if mask[..., 1:3].any():
        _, start_labels, _, stop_labels = batch.decision_labels()
        start_logits, stop_logits = model.start_logits(hidden), model.stop_logits(hidden)
        start = decision_logprobs(start_logits, start_labels.bool()).to(precise)
        stop = decision_logprobs(stop_logits, stop_labels.bool()).to(precise)
    if mask[..., 3].any():
        means = model.latent_inputs(F.pad(hidden, (0, 0, 1, 0))[:, :-1])  # (B, T, H): mean from the position before
        latent = gaussian_logprob(slot_inputs, means, latent_noise_std).to(precise)
    logprobs = torch.stack([token, start, stop, latent], -1)
    logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))
    return PolicyOutput(Actions(logprobs, mask), entropy, start_logits, stop_logits, means)
