"""Where phase 2's work runs: in this process (`local_backend`) or on Ray actors (`ray_backend`).

Both backends have the same methods (`launch`, `collect`, `score`, `update`, `sync`,
`save_checkpoint`, `restore`, `finish`, `close`), so the GRPO loop does not know
which one it drives.
"""

from __future__ import annotations

from dataclasses import replace

from rlatent.config import RunConfig
from rlatent.data.examples import encode_stop_sequences
from rlatent.latent.sampler import SamplingSettings


def rollout_settings(cfg: RunConfig, tokenizer) -> SamplingSettings:
    """How phase 2's rollouts sample (`SamplingSettings.for_rollouts`), with `grpo.stop` encoded for
    `tokenizer`: one definition for the backends and for tools that replay rollouts."""
    return replace(SamplingSettings.for_rollouts(cfg.latent, cfg.grpo),
                   stop_sequences=encode_stop_sequences(cfg.grpo.stop, tokenizer))


def make_backend(cfg: RunConfig, model, tokenizer):
    """The backend `distributed.backend` names, around the policy `model` (a `LatentModel`)."""
    settings = rollout_settings(cfg, tokenizer)
    if cfg.distributed.backend == "ray":
        from rlatent.distributed.ray_backend import RayBackend

        return RayBackend(cfg, model, tokenizer, settings)
    from rlatent.distributed.local_backend import LocalBackend

    return LocalBackend(cfg, model, tokenizer, settings)
