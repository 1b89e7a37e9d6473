"""Length penalty: a price on answer tokens beyond a target, and on truncated answers."""

from __future__ import annotations


def length_penalty(
    prompts: list[str],
    completions: list[str],
    tokens: list[int],
    truncated: list[bool],
    target: int = 0,
    cost: float = 0.001,
    truncation_cost: float = 0.0,
    **kwargs,
) -> list[float]:
    """`-cost * max(0, tokens - target)`, minus `truncation_cost` when the answer hit
    `max_new_tokens` without EOS. Counts answer tokens only; latents are priced by `latent_cost`."""
    return [-cost * max(0, n - target) - (truncation_cost if cut else 0.0) for n, cut in zip(tokens, truncated)]
