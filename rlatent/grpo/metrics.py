"""What a GRPO step logs about its rollouts: the policy's behaviour over every rollout drawn, and the batch
the update trained on.

With dynamic sampling the update keeps the groups whose reward differs, i.e. the prompts of medium
difficulty for the current policy, so statistics of the update's batch describe the selection, not the
policy. Rewards, accuracy, latents, blocks, tokens, truncation, start/stop rates and log-probs are therefore
taken over every rollout of every round (`reward_metrics`, `policy_metrics`); what only the update has,
its advantages and action counts, over its batch (`update_metrics`). Without dynamic sampling the two
coincide. docs/grpo.md lists every metric.
"""

from __future__ import annotations

import torch

from rewards.registry import reward_stats
from rlatent.data.grading import answer_concentration, flexible_extract, strict_match
from rlatent.data.marks import extract_final_answer
from rlatent.grpo.dynamic_sampling import ScoredRound
from rlatent.latent.trajectory import ACTION_KINDS, Trajectories


def reward_metrics(rounds: list[ScoredRound], group_size: int) -> dict[str, float]:
    """Rewards and accuracy over every rollout the step sampled (all rounds)."""
    problems = [p for r in rounds for p in r.problems]
    completions = [c for r in rounds for c in r.completions]
    answers = [p.final_answer for p in problems]
    per_reward = {name: [v for r in rounds for v in r.per_reward[name]] for name in rounds[0].per_reward}
    rewards = torch.cat([r.rewards for r in rounds])
    metrics = reward_stats(per_reward)
    metrics.update({f"reward/{name}_zeroed": float(sum(r.zeroed[name] for r in rounds))
                    for name in rounds[0].zeroed})
    metrics["reward_mean"] = float(rewards.mean())
    metrics["reward_std"] = float(rewards.std(unbiased=False))
    if "gsm8k_correct" in per_reward:
        metrics["accuracy"] = sum(per_reward["gsm8k_correct"]) / len(problems)
    # lm-evaluation-harness's two GSM8K filters, so rollout accuracy compares with published tables.
    metrics["strict_match"] = sum(map(strict_match, completions, answers)) / len(problems)
    metrics["flexible_extract"] = sum(map(flexible_extract, completions, answers)) / len(problems)
    # A policy that learns one answer for every problem shows here before it shows in an evaluation.
    finished = [done for r in rounds for done in r.traj.finished.tolist()]
    predicted = [extract_final_answer(text, done) for text, done in zip(completions, finished)]
    metrics.update(answer_concentration(predicted, answers))
    metrics["groups_drawn"] = float(len(problems) // group_size)
    metrics["rollouts_drawn"] = float(len(problems))
    return metrics


def policy_metrics(drawn: Trajectories, noisy_latents: bool) -> dict[str, float]:
    """Latents, blocks, tokens, truncation, decision rates and log-probs of every rollout drawn.

    `logprob_<kind>_per_completion` is the mean over completions of the summed log-probs of that kind of
    action, each kind's part of the trajectory log-prob. Sums, not shares: a latent's Gaussian log-density is
    a density in H dimensions and can be far above 0 (a small noise std makes it large and positive), so a
    "share" of a total mixing it with token log-probs (all <= 0) was no fraction at all.
    """
    counts = drawn.counts()
    metrics = {
        "latents_per_completion": float(counts["latents"].float().mean()),
        "blocks_per_completion": float(counts["blocks"].float().mean()),
        "tokens_per_completion": float(counts["tokens"].float().mean()),
        "truncated": float((~drawn.finished).float().mean()),
    }
    _, start_labels, _, stop_labels = drawn.batch.decision_labels()
    free_start, free_stop = drawn.start_decided, drawn.stop_decided
    metrics["start_rate"] = float(start_labels[free_start].mean()) if free_start.any() else 0.0
    metrics["stop_rate"] = float(stop_labels[free_stop].mean()) if free_stop.any() else 0.0
    actions = drawn.actions(noisy_latents)
    per_completion = torch.where(actions.mask, actions.logprobs, 0.0).sum(1).mean(0)  # (K,)
    for k, kind in enumerate(ACTION_KINDS):
        metrics[f"logprob_{kind}_per_completion"] = float(per_completion[k])
    return metrics


def update_metrics(traj: Trajectories, advantages: torch.Tensor, noisy_latents: bool) -> dict[str, float]:
    """The advantages and the actions of each kind in the update's batch (what the loss and KL are
    normalised by)."""
    mask = traj.actions(noisy_latents).mask
    metrics = {"advantage_mean": float(advantages.mean()), "advantage_std": float(advantages.std(unbiased=False)),
               "advantage_abs_max": float(advantages.abs().max())}
    for k, kind in enumerate(ACTION_KINDS):
        metrics[f"actions_{kind}"] = float(mask[..., k].sum())
    return metrics
