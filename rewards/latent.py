"""Latent cost: a price on thinking in latents, so the policy uses them only where they pay."""

from __future__ import annotations

from rlatent.errors import ConfigError


def latent_cost(
    prompts: list[str],
    completions: list[str],
    latents: list[int],
    forward_passes: list[int],
    per: str = "latent",
    cost: float = 0.01,
    **kwargs,
) -> list[float]:
    """`-cost * latents` (`per="latent"`) or `-cost * forward_passes` (`per="pass"`, tokens + latents).

    Per latent charges only the extra compute latents add; per pass charges all
    compute, so a shorter answer that thinks in latents is not penalised against a
    longer written one.
    """
    if per == "latent":
        counts = latents
    elif per == "pass":
        counts = forward_passes
    else:
        raise ConfigError(f"latent_cost: per must be 'latent' or 'pass', got {per!r}")
    return [-cost * n for n in counts]
