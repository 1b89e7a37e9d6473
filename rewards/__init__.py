"""Reward functions for GRPO (phase 2).

A reward is a plain function over one batch of completions:

    def my_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]

returning one float per completion. `kwargs` always holds, as lists with one
entry per completion, the trajectory facts `latents`, `blocks`, `tokens`
(answer tokens), `forward_passes` (tokens + latents) and `truncated` (hit
`max_new_tokens` without EOS), plus the dataset's columns (`question`,
`answer` (the final answer), `solution` (the reference solution with its
calculator marks), `source`), and then the reward's own `kwargs` from the config. A
reward takes what it needs by name and must accept `**kwargs` for the rest.

The built-ins below are chosen by name in `grpo.rewards`; anything else is
found by entry point (group `rlatent.rewards`) or dotted path
(`package.module:function`), see `rewards.registry.resolve_reward`.
"""

from rewards.gsm8k import gsm8k_correct, gsm8k_flexible_extract, gsm8k_format, gsm8k_strict_match
from rewards.latent import latent_cost
from rewards.length import length_penalty
from rewards.steps import gsm8k_steps

BUILTIN_REWARDS = {
    "gsm8k_correct": gsm8k_correct,
    "gsm8k_format": gsm8k_format,
    "gsm8k_strict_match": gsm8k_strict_match,
    "gsm8k_flexible_extract": gsm8k_flexible_extract,
    "gsm8k_steps": gsm8k_steps,
    "latent_cost": latent_cost,
    "length_penalty": length_penalty,
}

__all__ = ["BUILTIN_REWARDS", "gsm8k_correct", "gsm8k_flexible_extract", "gsm8k_format", "gsm8k_steps",
           "gsm8k_strict_match", "latent_cost", "length_penalty"]
