"""A batch of sequences that mix language positions and latent slots.

Rows are right-padded. A latent slot holds the pad id in `input_ids` (it has no
token); its input embedding is computed by the latent forward. The labels the
losses need (targets, start and stop labels) are derived from the masks here,
once, so every caller agrees on where a decision is made:

- a *start decision* is made at every language position from the last prompt
  position to the position before the last token: label 1 iff the next
  position is a latent slot;
- a *stop decision* is made at every latent slot: label 1 iff the next
  position is language (or the end);
- a *target token* is every answer token; it is predicted from the hidden
  state of the position before it, which may be a latent slot.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class LatentBatch:
    input_ids: torch.Tensor  # (B, T) long; pad id at latent slots and padding
    latent_mask: torch.Tensor  # (B, T) bool; True at latent slots
    attention_mask: torch.Tensor  # (B, T) bool; True at real positions
    prompt_lengths: torch.Tensor  # (B,) long
    next_step_mask: torch.Tensor | None = None  # (B, T) bool; tokens of the step after a block
    anchor_mask: torch.Tensor | None = None  # (B, T) bool; the examples' `anchors` (self-distillation)
    chain_ids: torch.Tensor | None = None  # (B, T, C) long; at each latent slot its `slot_chains` tokens, -1 after

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(1)

    def to(self, device: torch.device) -> "LatentBatch":
        return LatentBatch(**{f.name: _move(getattr(self, f.name), device) for f in fields(self)})

    def select(self, rows: torch.Tensor) -> "LatentBatch":
        """The sub-batch of `rows`, trimmed to its own longest row."""
        width = int(self.lengths[rows].max())
        return LatentBatch(**{f.name: _rows(getattr(self, f.name), rows, width) for f in fields(self)})

    def positions(self) -> torch.Tensor:
        """(B, T) index of each position within its row (0 for padding)."""
        return (self.attention_mask.long().cumsum(1) - 1).clamp_min(0)

    def answer_mask(self) -> torch.Tensor:
        """(B, T) True at positions after the prompt."""
        index = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (index[None, :] >= self.prompt_lengths[:, None]) & self.attention_mask

    def target_mask(self) -> torch.Tensor:
        """(B, T) True at answer tokens (predicted from the position before)."""
        return self.answer_mask() & ~self.latent_mask

    def block_index(self) -> torch.Tensor:
        """(B, T) index of each latent slot within its block (0, 1, ...); 0 elsewhere."""
        index = torch.arange(self.input_ids.shape[1], device=self.input_ids.device).expand_as(self.input_ids)
        last_language = torch.where(self.latent_mask, -1, index).cummax(1).values  # (B, T)
        return (index - last_language - 1).clamp_min(0) * self.latent_mask

    def decision_labels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Start/stop labels and where they apply.

        Returns `start_mask`, `start_labels`, `stop_mask`, `stop_labels`, all (B, T);
        labels are float 0/1, meaningful only where the mask is True.
        """
        real = self.attention_mask
        next_latent = torch.zeros_like(self.latent_mask)
        next_latent[:, :-1] = self.latent_mask[:, 1:]
        next_real = torch.zeros_like(real)
        next_real[:, :-1] = real[:, 1:]
        index = torch.arange(self.input_ids.shape[1], device=real.device)
        decides = index[None, :] >= (self.prompt_lengths[:, None] - 1)
        start_mask = real & ~self.latent_mask & decides & next_real
        stop_mask = real & self.latent_mask
        return start_mask, next_latent.float(), stop_mask, (~next_latent).float()


def collate(examples, pad_id: int) -> LatentBatch:
    """SFT examples (`input_ids`, `latent_mask`, `prompt_length`, `next_step_mask`, `anchors`, `slot_chains`)
    -> right-padded batch; `chain_ids` only when some example has `slot_chains`."""
    width = max(len(e.input_ids) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    latent_mask = torch.zeros(batch, width, dtype=torch.bool)
    attention_mask = torch.zeros(batch, width, dtype=torch.bool)
    next_step_mask = torch.zeros(batch, width, dtype=torch.bool)
    anchor_mask = torch.zeros(batch, width, dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        latent_mask[row, :n] = torch.tensor(example.latent_mask)
        attention_mask[row, :n] = True
        next_step_mask[row, :n] = torch.tensor(example.next_step_mask)
        anchor_mask[row, list(example.anchors)] = True
    prompt_lengths = torch.tensor([e.prompt_length for e in examples])
    return LatentBatch(input_ids, latent_mask, attention_mask, prompt_lengths, next_step_mask, anchor_mask,
                       _chain_ids(examples, width))


def _chain_ids(examples, width: int) -> torch.Tensor | None:
    """(B, T, C) the tokens each latent slot stands for (`SFTExample.slot_chains`), -1 padded; None when no
    example has any."""
    if not any(e.slot_chains for e in examples):
        return None
    longest = max(len(chain) for e in examples for chain in e.slot_chains)
    chain_ids = torch.full((len(examples), width, longest), -1, dtype=torch.long)
    for row, example in enumerate(examples):
        slots = [i for i, slot in enumerate(example.latent_mask) if slot]
        if len(slots) != len(example.slot_chains):
            raise ValueError(f"row {row}: {len(slots)} latent slots but {len(example.slot_chains)} slot chains")
        for position, chain in zip(slots, example.slot_chains):
            chain_ids[row, position, : len(chain)] = torch.tensor(chain)
    return chain_ids


def _rows(value, rows: torch.Tensor, width: int):
    if value is None:
        return None
    return value[rows] if value.dim() == 1 else value[rows, :width]


def _move(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value
