"""Rollout work units, and the engines that sample them (`make_engine`).

A step's prompts are split into chunks of whole prompt groups, each sampled
under its own seed derived from (run seed, step, chunk). A chunk is what a Ray
rollout worker takes, and what it redoes when it dies: the redone chunk is the
same sample. Equal chunking therefore gives equal rollouts on the local and the
Ray backend. `Trajectories.concat` joins the chunks back into one batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from rlatent.data.examples import special_token_ids
from rlatent.model.latent_model import LatentModel
from rlatent.latent.sampler import SamplingSettings, sample
from rlatent.latent.trajectory import Trajectories
from rlatent.workers.weight_sync import load_trainable_state


@dataclass(frozen=True)
class RolloutChunk:
    index: int
    prompts: list[list[int]]  # token ids, one entry per completion; groups are consecutive
    seed: int


def make_chunks(prompts: list[list[int]], group_size: int, chunks: int, seed: int, step: int,
                round_index: int = 0) -> list[RolloutChunk]:
    """Split `prompts` (groups of `group_size` consecutive rows) into `chunks` near-equal runs of groups.
    `round_index`: which of the step's sampling rounds (dynamic sampling) the prompts are; each gets seeds
    of its own."""
    groups = len(prompts) // group_size
    bounds = [round(i * groups / chunks) * group_size for i in range(chunks + 1)]
    return [RolloutChunk(i, prompts[bounds[i]:bounds[i + 1]], chunk_seed(seed, step, i, round_index))
            for i in range(chunks)]


STREAM_OFFSET = 2**31 + 11
"""Seed distance between the sampling seeds of dynamic sampling's rounds. torch seeds its CPU
generator with the seed's low 32 bits, so a multiple of 2**32 would give the same numbers again; this is
half-way round, so no step a run reaches lands on another round's seed."""


def chunk_seed(seed: int, step: int, index: int, round_index: int = 0) -> int:
    """Round 0 keeps the seeds runs had before dynamic sampling existed."""
    return (seed * 1_000_003 + step * 1_009 + index + round_index * STREAM_OFFSET) % (2**63)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run under a fixed torch seed without disturbing the caller's RNG streams."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class SamplerEngine:
    """rlatent's latent-aware sampler on one model: the local backend's engine (sharing the learner's model)
    and each Ray rollout worker's (with synced weights)."""

    def __init__(self, model: LatentModel, eos_id: int, pad_id: int, settings: SamplingSettings):
        self.model, self.eos_id, self.pad_id, self.settings = model, eos_id, pad_id, settings

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], seed: int) -> Trajectories:
        self.model.eval()
        with seeded(seed, self.model.device):
            return sample(self.model, prompts, self.eos_id, self.pad_id, self.settings)

    def load_trainable(self, state: dict[str, torch.Tensor], version: int) -> None:
        load_trainable_state(self.model, state)


def make_engine(kind: str, model: LatentModel, tokenizer, settings: SamplingSettings, cache_dir: str | None):
    """The rollout engine `grpo.engine` names, around `model` (rlatent) or its base (vLLM)."""
    eos_id, pad_id = special_token_ids(tokenizer)
    if kind == "vllm":
        from rlatent.model.loading import resolve_source
        from rlatent.workers.vllm_engine import VLLMEngine

        return VLLMEngine(resolve_source(model.settings.base_model, cache_dir), model.settings, tokenizer, settings,
                          eos_id, pad_id, model.hidden_size)
    return SamplerEngine(model, eos_id, pad_id, settings)
