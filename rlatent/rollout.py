"""Rollout work units, and the engines that sample them (`make_engine`).

A step's prompts are split into chunks of whole prompt groups, each sampled
under its own seed derived from (run seed, step, chunk). A chunk is what a Ray
rollout worker takes, and what it redoes when it dies: the redone chunk is the
same sample. Equal chunking therefore gives equal rollouts on the local and the
Ray backend. `concat_trajectories` joins the chunks back into one batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator

import torch

from rlatent.batch import LatentBatch
from rlatent.examples import special_token_ids
from rlatent.latent_model import LatentModel
from rlatent.sampler import SamplingSettings, Trajectories, sample
from rlatent.weight_sync import load_trainable_state


@dataclass(frozen=True)
class RolloutChunk:
    index: int
    prompts: list[list[int]]  # token ids, one entry per completion; groups are consecutive
    seed: int


def make_chunks(prompts: list[list[int]], group_size: int, chunks: int, seed: int, step: int) -> list[RolloutChunk]:
    """Split `prompts` (groups of `group_size` consecutive rows) into `chunks` near-equal runs of groups."""
    groups = len(prompts) // group_size
    bounds = [round(i * groups / chunks) * group_size for i in range(chunks + 1)]
    return [RolloutChunk(i, prompts[bounds[i]:bounds[i + 1]], chunk_seed(seed, step, i)) for i in range(chunks)]


def chunk_seed(seed: int, step: int, index: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + index) % (2**63)


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
        from rlatent.loading import resolve_source
        from rlatent.vllm_engine import VLLMEngine

        return VLLMEngine(resolve_source(model.settings.base_model, cache_dir), model.settings, tokenizer, settings,
                          eos_id, pad_id, model.hidden_size)
    return SamplerEngine(model, eos_id, pad_id, settings)


def concat_trajectories(parts: list[Trajectories], pad_id: int) -> Trajectories:
    """One batch from chunks sampled apart: rows stacked, right-padded to the longest."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.batch.input_ids.shape[1] for p in parts)

    def stack(tensors: list[torch.Tensor | None], fill) -> torch.Tensor | None:
        if tensors[0] is None:
            return None
        if tensors[0].dim() == 1:
            return torch.cat(tensors)
        padded = []
        for t in tensors:
            extra = torch.full((t.shape[0], width - t.shape[1], *t.shape[2:]), fill, dtype=t.dtype, device=t.device)
            padded.append(torch.cat([t, extra], 1))
        return torch.cat(padded)

    batch = LatentBatch(**{f.name: stack([getattr(p.batch, f.name) for p in parts],
                                         pad_id if f.name == "input_ids" else 0)
                           for f in fields(LatentBatch)})
    values = {f.name: stack([getattr(p, f.name) for p in parts], 0)
              for f in fields(Trajectories) if f.name not in ("batch", "forward_passes")}
    return Trajectories(batch=batch, forward_passes=sum(p.forward_passes for p in parts), **values)


def slice_trajectories(traj: Trajectories, start: int, stop: int) -> Trajectories:
    """Rows `start:stop`, trimmed to their own longest row: one learner rank's share of a batch."""
    width = int(traj.batch.lengths[start:stop].max())

    def cut(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return t[start:stop] if t.dim() == 1 else t[start:stop, :width]

    batch = LatentBatch(**{f.name: cut(getattr(traj.batch, f.name)) for f in fields(LatentBatch)})
    values = {f.name: cut(getattr(traj, f.name)) for f in fields(Trajectories) if f.name not in ("batch", "forward_passes")}
    return Trajectories(batch=batch, forward_passes=traj.forward_passes, **values)
