"""A trajectory's actions and their log-probabilities, stored and recomputed.

Every action sits at a position and is of one kind:

- `token`: the token at an answer position (log-prob at the sampling temperature);
- `start`: a free start decision taken at a language position;
- `stop`: a free stop decision taken at a latent slot;
- `latent`: a latent drawn with exploration noise, z ~ N(proj(h), std^2 I)
  (its log-density), only when `latent_noise_std > 0`.

Forced decisions (at a cap) are not actions. Both views come as `(B, T, K)`
log-probs with a mask, so the GRPO loss treats every action alike and counts
each kind separately in the logs.

Recomputing with gradient: without exploration noise and with
`gradient="recurrent"` the latents are recomputed with the current weights
through the recurrence (exact). With noise the sampled latents are actions:
they are fed back as stored and the gradient reaches `proj(h)` through their
log-density (the score function), as for any sampled action; `detached` also
feeds the stored latents, without that density term when there is no noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlatent.batch import LatentBatch
from rlatent.latent_forward import forward
from rlatent.latent_model import LatentModel
from rlatent.sampler import Trajectories, gaussian_logprob

ACTION_KINDS = ("token", "start", "stop", "latent")


@dataclass
class Actions:
    logprobs: torch.Tensor  # (B, T, K) one slot per position and kind
    mask: torch.Tensor  # (B, T, K) bool: a real action

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T*K) log-probs and mask, the layout the GRPO loss takes."""
        rows = self.logprobs.shape[0]
        return self.logprobs.reshape(rows, -1), self.mask.reshape(rows, -1)

    def select(self, rows: torch.Tensor, width: int) -> "Actions":
        """The actions of `rows` at the first `width` positions (a trimmed micro-batch)."""
        return Actions(self.logprobs[rows, :width], self.mask[rows, :width])


def stored_actions(traj: Trajectories, noisy_latents: bool) -> Actions:
    """The sampler's own log-probs of what it did."""
    batch = traj.batch
    latent_mask = batch.latent_mask & noisy_latents
    logprobs = torch.stack([traj.token_logprobs, traj.start_logprobs, traj.stop_logprobs, traj.latent_logprobs], -1)
    mask = torch.stack([batch.target_mask(), traj.start_decided, traj.stop_decided, latent_mask], -1)
    return Actions(logprobs, mask)


def recompute_actions(model: LatentModel, batch: LatentBatch, slot_inputs: torch.Tensor, mask: torch.Tensor,
                      temperature: float, latent_noise_std: float, gradient: str,
                      pass_cost: float | None = None) -> tuple[Actions, torch.Tensor]:
    """Log-probs of the stored actions under the current weights; also (N,) token entropies (no grad).

    `mask` (B, T, K) says which actions exist (from `stored_actions`).
    """
    fixed_latents = latent_noise_std > 0 or gradient == "detached"
    out = forward(model, batch, gradient, slot_inputs=slot_inputs if fixed_latents else None, pass_cost=pass_cost)
    hidden = out.hidden  # (B, T, H)
    rows, length = batch.input_ids.shape
    targets = mask[..., 0]
    source = targets[:, 1:]  # position t-1 predicts the token at t
    precise = torch.promote_types(hidden.dtype, torch.float32)  # as the sampler: at least float32
    logits = model.token_logits(hidden[:, :-1][source]).to(precise) / temperature  # (N, V)
    log_softmax = torch.log_softmax(logits, -1)
    token = torch.zeros(rows, length, dtype=log_softmax.dtype, device=hidden.device)
    token[targets] = log_softmax.gather(1, batch.input_ids[targets][:, None])[:, 0]
    with torch.no_grad():
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)

    _, start_labels, _, stop_labels = batch.decision_labels()
    start_logit, stop_logit = model.start_logits(hidden).to(precise), model.stop_logits(hidden).to(precise)
    start = F.logsigmoid(torch.where(start_labels.bool(), start_logit, -start_logit))
    stop = F.logsigmoid(torch.where(stop_labels.bool(), stop_logit, -stop_logit))

    latent = torch.zeros_like(token)
    if latent_noise_std > 0:
        means = model.latent_inputs(F.pad(hidden, (0, 0, 1, 0))[:, :-1])  # (B, T, H): proj(h) of the position before
        latent = gaussian_logprob(slot_inputs, means, latent_noise_std).to(token.dtype)
    logprobs = torch.stack([token, start.to(token.dtype), stop.to(token.dtype), latent], -1)
    logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))
    return Actions(logprobs, mask), entropy
