"""Phase-2 GRPO math: group advantages, the clipped surrogate, k3 KL, aggregation.

Pure functions on plain tensors: no model, no config. An *action* is anything
with a log-probability in a trajectory — a token, an unforced start decision,
an unforced stop decision, a latent's Gaussian log-density — and every action
counts like a token in the ratio, the clipping and the aggregation. The
trainer stacks them into (B, A) tensors — B completions, A action slots — with
a bool mask (B, A) of the real ones; forced decisions have no slot.

Variants are chosen by name from registries: `ADVANTAGE_SCALES`
(`scale_rewards`) and `AGGREGATIONS` (`loss_type`).

Gradient accumulation. Every loss type is *an additive total over rows*
divided by *a normaliser of the whole batch*:

    dapo     Σ_real loss                      / (real actions in the batch)
    grpo     Σ_rows (mean of the row's loss)  / (rows with ≥ 1 action)
    dr_grpo  Σ_real loss                      / (B × max_actions)

So the trainer computes the normaliser once from the full batch's mask and
passes it to every micro-batch; the micro-batch losses then *sum* (no further
division) to the full-batch loss, and 1×8 accumulation equals 8×1:

    norm = normaliser(mask, cfg.loss_type, max_actions)          # full batch
    for rows in micro_batches:
        loss, stats = grpo_loss(..., mask=mask[rows], normaliser=norm, ...)
        loss.backward()                                            # no / n_micro

Dividing each micro-batch by its own count instead would weight the actions of
short micro-batches more (dapo), or shrink each row by the number of
micro-batches (grpo, dr_grpo). Across data-parallel ranks the same holds with
the normaliser of the global batch.

`num_iterations`. The trainer stores `old_logprobs` once per batch of rollouts
and reuses them for every update on it. On the first update the policy has not
moved, the ratio is exactly 1 and the gradient is the plain policy gradient
−A·∇logp / normaliser; later updates see ratio ≠ 1 and the clip bites. For the
ratio to be exactly 1 the old log-probs must come from the same computation as
the training forward (a no-grad pass of it, or `logprobs.detach()` when
`num_iterations == 1`), not from the sampler in a lower precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

STD_EPS = 1e-4
"""Added to the std before dividing (TRL's value): a group whose rewards are all equal gets advantage 0."""


# --- advantages -----------------------------------------------------------------------------------------------

def _group_std(grouped: Tensor, unbiased: bool) -> Tensor:
    return grouped.std(dim=1, keepdim=True, unbiased=unbiased) + STD_EPS  # (P, 1)


def _batch_std(grouped: Tensor, unbiased: bool) -> Tensor:
    return grouped.std(unbiased=unbiased) + STD_EPS  # scalar: the std of every reward in the batch


def _no_scale(grouped: Tensor, unbiased: bool) -> Tensor:
    return torch.ones((), dtype=grouped.dtype, device=grouped.device)


ADVANTAGE_SCALES: dict[str, Callable[[Tensor, bool], Tensor]] = {
    "group": _group_std,  # GRPO
    "batch": _batch_std,  # the batch's std: keeps a group of near-equal rewards from being blown up
    "none": _no_scale,  # Dr. GRPO: std scaling biases towards groups that are too easy or too hard
}
"""`scale_rewards` name -> divisor of the centred rewards, from the rewards grouped as (P, G) and whether
the std is the sample (Bessel-corrected) one."""

STD_KINDS = {"population": False, "sample": True}
"""`advantage_std` name -> `unbiased` flag of the std that scales advantages."""


def group_advantages(rewards: Tensor, group_size: int, scale: str, std: str = "population") -> Tensor:
    """Advantages (N,) of rewards (N,) ordered as N / group_size consecutive groups.

    advantage = reward − its group's mean, divided by `ADVANTAGE_SCALES[scale]`
    (plus `STD_EPS`). `std`: `population` (unbiased=False; a group [1, 0, 0, 1]
    gets advantages ±1) or `sample` (Bessel's correction, what TRL and verl use:
    every advantage sqrt(G/(G−1)) smaller, ×0.935 at G=8, ≈ a learning-rate
    change). `batch` divides by the std over all N rewards (the global batch:
    the trainer must pass every rank's rewards).
    """
    if std not in STD_KINDS:
        raise ValueError(f"unknown advantage std {std!r}; expected one of {sorted(STD_KINDS)}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; expected one of {sorted(ADVANTAGE_SCALES)}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (P, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return (centred / ADVANTAGE_SCALES[scale](grouped, STD_KINDS[std])).view(-1)


# --- per-action terms -----------------------------------------------------------------------------------------

KL_CLAMP = 10.0
"""k3 is clamped to [-10, 10] per action, as verl does: one action whose reference probability is tiny
would otherwise make exp(d) overflow the whole batch's loss."""


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref) per action, same shape as the inputs, ≥ 0.

    With d = ref − logp: exp(d) − d − 1. Unbiased (E_π[exp(d)] = 1), and 0
    exactly where the two log-probs agree. Clamped to `KL_CLAMP`.

    Its value estimates KL(π‖π_ref), but used as a loss its gradient,
    (1 − π_ref/π)·∇logπ, is in expectation over π the gradient of the other
    direction, KL(π_ref‖π) (Tang & Munos, arXiv 2506.09477); times the
    importance ratio (`grpo_loss`'s `kl_bias_correction`) it is that of
    KL(π‖π_ref). The two agree to second order near the reference.
    """
    d = ref_logprobs - logprobs
    return torch.clamp(torch.exp(d) - d - 1, -KL_CLAMP, KL_CLAMP)


def masked_kl_k3(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """k3 where `mask`, exactly 0 elsewhere; garbage (inf, NaN) at masked slots reaches neither the value
    nor the gradient, because it is replaced before any arithmetic."""
    return kl_k3(torch.where(mask, logprobs, 0.0), torch.where(mask, ref_logprobs, 0.0))


def clipped_objective(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                      epsilon_low: float, epsilon_high: float) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped surrogate with asymmetric clipping (DAPO's clip-higher), per action.

    logprobs (B, A) with grad, old_logprobs (B, A), advantages (B,) one per
    completion, mask (B, A) bool. Returns the per-action loss (B, A), 0 at
    masked slots, and stats (fractions over real actions):
    `clip_low` (ratio < 1 − ε_low with A < 0), `clip_high` (ratio > 1 + ε_high
    with A > 0) — where the clip is active and the gradient is 0 — and
    `ratio_mean`.

    Masked slots are replaced by 0 *before* any arithmetic (torch.where, not a
    multiplication by the mask), so garbage there — inf, NaN — reaches neither
    the loss nor the gradient.
    """
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)  # (B, A)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]  # (B, 1)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_action = torch.where(mask, -torch.minimum(ratio * adv, clipped * adv), 0.0)
    with torch.no_grad():
        count = max(int(mask.sum()), 1)
        low = ((ratio < 1 - epsilon_low) & (adv < 0) & mask).sum().item() / count
        high = ((ratio > 1 + epsilon_high) & (adv > 0) & mask).sum().item() / count
        stats = {"clip_low": low, "clip_high": high, "ratio_mean": ratio[mask].sum().item() / count}
    return per_action, stats


# --- aggregation ----------------------------------------------------------------------------------------------

def action_total(per_action: Tensor, mask: Tensor) -> Tensor:
    """Σ over real actions of per_action (B, A) -> scalar."""
    return torch.where(mask, per_action, 0.0).sum()


def sequence_mean_total(per_action: Tensor, mask: Tensor) -> Tensor:
    """Σ over rows of each row's mean over its real actions (B, A) -> scalar; a row with none adds 0."""
    counts = mask.sum(dim=1).clamp_min(1)  # (B,)
    return (torch.where(mask, per_action, 0.0).sum(dim=1) / counts).sum()


def count_actions(mask: Tensor, max_actions: int) -> float:
    return float(max(int(mask.sum()), 1))


def count_sequences(mask: Tensor, max_actions: int) -> float:
    """Rows with at least one action. A row with none is left out of the mean (TRL counts it as a 0): an
    empty completion says nothing about the policy and should not shrink everyone else's gradient."""
    return float(max(int(mask.any(dim=1).sum()), 1))


def fixed_budget(mask: Tensor, max_actions: int) -> float:
    """B × max_actions: a constant of the run, independent of the sampled lengths (Dr. GRPO, which takes
    the generation budget; `grpo.dr_grpo_constant` says which)."""
    return float(mask.shape[0] * max_actions)


@dataclass(frozen=True)
class Aggregation:
    """A loss type: an additive `total` over rows divided by a `normaliser` of the whole batch.

    Called as `(per_action (B, A), mask (B, A), max_actions) -> scalar` on one
    whole batch; kept as two parts so that micro-batches can share the full
    batch's normaliser (see the module docstring).
    """

    total: Callable[[Tensor, Tensor], Tensor]
    normaliser: Callable[[Tensor, int], float]

    def __call__(self, per_action: Tensor, mask: Tensor, max_actions: int) -> Tensor:
        return self.total(per_action, mask) / self.normaliser(mask, max_actions)


AGGREGATIONS: dict[str, Aggregation] = {
    "dapo": Aggregation(action_total, count_actions),  # token-level: long completions weigh more
    "grpo": Aggregation(sequence_mean_total, count_sequences),  # each completion weighs the same
    "dr_grpo": Aggregation(action_total, fixed_budget),  # token-level, no length-dependent normaliser
}
"""`loss_type` name -> aggregation of per-action losses into the batch loss."""


def _aggregation(loss_type: str) -> Aggregation:
    if loss_type not in AGGREGATIONS:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[loss_type]


def normaliser(mask: Tensor, loss_type: str, max_actions: int) -> float:
    """The divisor of `loss_type` for the whole batch, from its mask (B, A).

    Pass it as `grpo_loss(..., normaliser=...)` to every micro-batch of that
    batch; summing the micro-batch losses then gives the full-batch loss.
    """
    return _aggregation(loss_type).normaliser(mask, max_actions)


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, kl: Tensor | None, advantages: Tensor,
              mask: Tensor, *, loss_type: str, epsilon_low: float, epsilon_high: float, beta: float,
              max_actions: int, normaliser: float | None = None,
              kl_bias_correction: bool = False) -> tuple[Tensor, dict[str, float]]:
    """The GRPO loss of one (micro-)batch: clipped surrogate + β·KL per action, aggregated by `loss_type`.

    logprobs (B, A) with grad; old_logprobs (B, A) stored at sampling time;
    kl (B, A) per-action KL to the reference with grad (`masked_kl_k3` for
    tokens; exact terms for decisions and latents), 0 for actions without a
    reference, or None; advantages (B,); mask (B, A) bool. The KL term is
    added per action before aggregation (as TRL does), only when β > 0 and kl
    is given; `kl_bias_correction` multiplies it by the importance ratio
    (TRL 1.16's `use_bias_correction_kl`, default there; it makes k3 unbiased
    when the samples come from the old policy). Without it the k3 term's
    gradient estimates ∇KL(π_ref‖π), with it ∇KL(π‖π_ref) (`kl_k3`); the exact
    decision terms the reference passes in take the same direction
    (`rlatent.grpo.reference`), so β pulls every kind the same way. `normaliser`: the full batch's
    (`normaliser(full_mask, ...)`) when this is a micro-batch; None = this
    batch's own. Returns the scalar loss and stats: `clip_low`, `clip_high`,
    `clip_fraction`, `ratio_mean`, `kl` (mean over real actions, when
    computed) and `actions` (count) — fractions are over this micro-batch's
    actions; weigh them by `actions` to combine micro-batches.
    """
    aggregation = _aggregation(loss_type)
    per_action, stats = clipped_objective(logprobs, old_logprobs, advantages, mask, epsilon_low, epsilon_high)
    stats["clip_fraction"] = stats["clip_low"] + stats["clip_high"]
    actions = int(mask.sum())
    stats["actions"] = float(actions)
    if beta > 0 and kl is not None:
        kl = torch.where(mask, kl, 0.0)  # (B, A)
        stats["kl"] = kl.detach().sum().item() / max(actions, 1)
        if kl_bias_correction:
            kl = kl * torch.exp(torch.where(mask, logprobs - old_logprobs, 0.0))
        per_action = per_action + beta * kl
    divisor = aggregation.normaliser(mask, max_actions) if normaliser is None else normaliser
    return aggregation.total(per_action, mask) / divisor, stats
