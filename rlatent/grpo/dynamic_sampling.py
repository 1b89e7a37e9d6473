"""Which sampled groups a GRPO update takes, when dynamic sampling draws more than one round.

GRPO's advantage is a reward minus its group's mean, so a group whose rewards are all equal contributes
nothing to the policy gradient, only to the KL term and to the cost of the update. DAPO (arXiv 2503.14476)
keeps sampling until the batch is full of groups whose accuracy is neither 0 nor 1. Here
(`grpo.dynamic_sampling_rounds`) the loop samples rounds of `prompts_per_step` prompts, scores each
(`ScoredRound`), stops once `enough_informative`, and `assemble` joins the groups `pick_groups` chose into
the update's batch.

Two departures from DAPO, both decided here:

- A group is informative when one named reward (`grpo.dynamic_sampling_reward`, by default
  `gsm8k_correct`) differs within it, as DAPO filters on accuracy; the weighted total would pass a group
  of eight wrong answers in which one lacks `####`, and its format-only advantages would be as large as
  those of a group with one right answer.
- The rounds are capped (compute is bounded per step), so when they run out the batch is topped up with
  uninformative groups and keeps its size. Those groups have zero advantage but stay in the loss's
  normaliser (`dapo`: their actions count) and carry the KL term: the policy-gradient part of the step is
  then the fraction `groups_informative / prompts_per_step` of a full one, as in plain GRPO, where DAPO's
  would be full. Dropping them instead would change the batch's size, the learner ranks' shares and the
  KL's sample from step to step. The loop logs the informative groups each step, so the effective step is
  visible.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rlatent.data.gsm8k import Problem
from rlatent.latent.trajectory import Trajectories


@dataclass
class ScoredRound:
    """One round of rollouts with their rewards; rows are groups of `group_size` consecutive completions."""

    problems: list[Problem]  # one per row
    traj: Trajectories
    rewards: torch.Tensor  # (rows,) the weighted total
    per_reward: dict[str, list[float]]  # each reward's values, unweighted
    zeroed: dict[str, int]  # failures scored 0, per reward
    completions: list[str]

    def informative(self, reward: str, group_size: int) -> torch.Tensor:
        """(groups,) bool: the groups in which `reward` (unweighted) is not the same for every completion."""
        return informative_groups(torch.tensor(self.per_reward[reward]), group_size)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(groups,) bool: the groups whose rewards (N,) are not all equal."""
    grouped = rewards.view(-1, group_size)
    return grouped.amax(dim=1) > grouped.amin(dim=1)


def enough_informative(rounds: list[ScoredRound], group_size: int, wanted: int, reward: str) -> bool:
    return sum(int(r.informative(reward, group_size).sum()) for r in rounds) >= wanted


def pick_groups(rounds: list[ScoredRound], group_size: int, wanted: int, reward: str) -> list[tuple[int, int]]:
    """(round, group) of the update's `wanted` groups: the informative ones (by `reward`) in the order they
    were drawn, then, when the rounds ran out first, uninformative ones in draw order, so that the batch
    keeps its size (see the module docstring)."""
    drawn = [(r, g, bool(flag)) for r, scored in enumerate(rounds)
             for g, flag in enumerate(scored.informative(reward, group_size).tolist())]
    ordered = [(r, g) for r, g, flag in drawn if flag] + [(r, g) for r, g, flag in drawn if not flag]
    return ordered[:wanted]


def assemble(rounds: list[ScoredRound], picks: list[tuple[int, int]], group_size: int,
             pad_id: int) -> tuple[Trajectories, torch.Tensor]:
    """The update's trajectories and rewards: the picked groups in the order given. Its `forward_passes`
    is every round's, what the batch cost to sample."""
    if len(rounds) == 1 and picks == [(0, g) for g in range(len(rounds[0].problems) // group_size)]:
        return rounds[0].traj, rounds[0].rewards
    spans = [(rounds[r], g * group_size, (g + 1) * group_size) for r, g in picks]
    traj = Trajectories.concat([scored.traj.rows(a, b) for scored, a, b in spans], pad_id)
    rewards = torch.cat([scored.rewards[a:b] for scored, a, b in spans])
    return replace(traj, forward_passes=sum(r.traj.forward_passes for r in rounds)), rewards
