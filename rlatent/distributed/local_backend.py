"""Phase 2 in one process: the learner, the rollout engine and the rewards all live here.

The default backend (tests, the CPU quick start). It has the same methods as
`rlatent.distributed.ray_backend.RayBackend`, so the GRPO loop does not know which one it
drives. rlatent's own engine shares the learner's model, so its weights are
always current; a vLLM engine holds its own copy and is synced after updates.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from rlatent.io.checkpoint import read_reference, restore_training_state, save_checkpoint
from rlatent.config import RunConfig
from rlatent.model.latent_model import LatentModel
from rlatent.grpo.learner import GRPOLearner
from rewards.registry import RewardSet
from rlatent.workers.rollout import RolloutChunk, SamplerEngine, make_engine
from rlatent.latent.sampler import SamplingSettings
from rlatent.latent.trajectory import Trajectories
from rlatent.workers.weight_sync import model_bytes, state_bytes


class LocalBackend:
    def __init__(self, cfg: RunConfig, model: LatentModel, tokenizer, settings: SamplingSettings):
        self.cfg = cfg
        self.learner = GRPOLearner(cfg, model)
        self.engine = make_engine(cfg.grpo.engine, model, tokenizer, settings, cfg.model.cache_dir)
        self.rewards = RewardSet(cfg.grpo.rewards, cfg.grpo.reward_errors)
        self.full_bytes = model_bytes(model)

    def launch(self, chunks: list[RolloutChunk], version: int) -> list[tuple[Trajectories, int]]:
        """Sample every chunk now (the ray backend only submits here); each result carries the weights'
        version it was sampled with."""
        return [(self.engine.sample(chunk.prompts, chunk.seed), version) for chunk in chunks]

    def collect(self, launched: list[tuple[Trajectories, int]], version: int) -> tuple[list[Trajectories], dict]:
        return [traj for traj, _ in launched], {}

    def score(self, prompts: list[str], completions: list[str], facts: dict, group_size: int):
        return self.rewards.score(prompts, completions, facts)

    def update(self, traj: Trajectories, advantages: torch.Tensor, step: int) -> dict[str, float]:
        return self.learner.update(traj, advantages, step)

    def sync(self, version: int) -> dict[str, float]:
        """Only an engine with its own weights (vLLM) needs them pushed."""
        if isinstance(self.engine, SamplerEngine):
            return {}
        started = time.perf_counter()
        state = self.learner.trainable_state()
        self.engine.load_trainable(state, version)
        return {"sync_bytes": state_bytes(state), "sync_fraction": state_bytes(state) / self.full_bytes,
                "sync_seconds": time.perf_counter() - started}

    def save_checkpoint(self, path: Path, step: int) -> Path:
        learner = self.learner
        with learner.optimizer.full_parameters():
            state = learner.checkpoint_state()
            return save_checkpoint(path, learner.model, "grpo", step, state["optimizer"], state["reference"])

    def restore(self, checkpoint: Path) -> int:
        step = restore_training_state(checkpoint, "grpo", self.learner.optimizer)
        reference = read_reference(checkpoint)
        if self.learner.reference is not None and reference:
            self.learner.reference.load_state_dict(reference)
        return step

    def finish(self, model: LatentModel) -> None:
        """The learner trained `model` itself: nothing to bring back."""

    def close(self) -> None:
        """Nothing to shut down in-process."""
