"""Sampled completions and the actions they hold: the one type the sampler returns and the learner reads.

A `Trajectories` is a right-padded `LatentBatch` of prompt + completion rows
with every log-probability the sampler took, aligned to the position where it
was taken. Engines build it, the GRPO loop joins the chunks of a step
(`concat`), Ray learner ranks take shares of its rows (`rows`), and the learner
moves it to its device (`to`) and reads its stored actions (`actions`).

Every action sits at a position and is of one kind (`ACTION_KINDS`):

- `token`: the token at an answer position (log-prob at the sampling temperature);
- `start`: a free start decision taken at a language position;
- `stop`: a free stop decision taken at a latent slot;
- `latent`: a latent drawn with exploration noise, z ~ N(mean, std^2 I)
  (its log-density), only when `latent_noise_std > 0`.

Forced decisions (at a cap) are not actions. `Actions` holds them as
`(B, T, K)` log-probs with a mask, so the GRPO loss treats every action alike
and the logs count each kind apart.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from rlatent.latent.batch import LatentBatch

ACTION_KINDS = ("token", "start", "stop", "latent")


@dataclass
class Actions:
    logprobs: torch.Tensor  # (B, T, K) one slot per position and kind
    mask: torch.Tensor  # (B, T, K) bool: a real action

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T*K) log-probs and mask, the layout the GRPO loss takes."""
        rows = self.logprobs.shape[0]
        return self.logprobs.reshape(rows, -1), self.mask.reshape(rows, -1)

    def select(self, rows: torch.Tensor, width: int) -> "Actions":
        """The actions of `rows` at the first `width` positions (a trimmed micro-batch)."""
        return Actions(self.logprobs[rows, :width], self.mask[rows, :width])


def kinds_mask(mask: torch.Tensor, kinds: tuple[str, ...]) -> torch.Tensor:
    """(B, T, K) action mask restricted to the action kinds named in `kinds`."""
    keep = torch.tensor([kind in kinds for kind in ACTION_KINDS], device=mask.device)
    return mask & keep


@dataclass
class Trajectories:
    """Sampled completions; every (B, T) tensor is aligned with `batch` positions."""

    batch: LatentBatch  # prompt + completion, right-padded
    token_logprobs: torch.Tensor  # (B, T) log-prob of the token at t (answer tokens only)
    start_logprobs: torch.Tensor  # (B, T) log-prob of the start decision taken at t
    start_decided: torch.Tensor  # (B, T) bool: a free start decision was taken at t
    stop_logprobs: torch.Tensor  # (B, T) log-prob of the stop decision taken at t (a latent slot)
    stop_decided: torch.Tensor  # (B, T) bool
    latent_logprobs: torch.Tensor  # (B, T) log-density of each sampled latent (0 without exploration noise)
    slot_inputs: torch.Tensor  # (B, T, H) input of each latent slot
    finished: torch.Tensor  # (B,) bool: ended with EOS (False: truncated)
    hidden: torch.Tensor | None  # (B, T, H) when `record_hidden`
    forward_passes: int  # model calls, prefill included

    # ---- reading -------------------------------------------------------------------------------

    def completion_ids(self, row: int) -> list[int]:
        """Token ids of a row's completion (latent slots left out)."""
        keep = self.batch.target_mask()[row]
        return self.batch.input_ids[row][keep].tolist()

    def counts(self) -> dict[str, torch.Tensor]:
        """Per-row latents, blocks and tokens of the completion, each (B,)."""
        latents = self.batch.latent_mask
        starts = latents & ~torch.nn.functional.pad(latents, (1, 0))[:, :-1]
        return {"latents": latents.sum(1), "blocks": starts.sum(1), "tokens": self.batch.target_mask().sum(1)}

    def actions(self, noisy_latents: bool) -> Actions:
        """The sampler's own log-probs of what it did; latents are actions only when they were explored."""
        batch = self.batch
        logprobs = torch.stack([self.token_logprobs, self.start_logprobs, self.stop_logprobs,
                                self.latent_logprobs], -1)
        mask = torch.stack([batch.target_mask(), self.start_decided, self.stop_decided,
                            batch.latent_mask & noisy_latents], -1)
        return Actions(logprobs, mask)

    # ---- reshaping -----------------------------------------------------------------------------

    def to(self, device: torch.device) -> "Trajectories":
        """On `device` (trajectories from a worker arrive on the CPU)."""
        if self.batch.input_ids.device == device:
            return self
        return self._map(lambda t: t.to(device), self.batch.to(device))

    def rows(self, start: int, stop: int) -> "Trajectories":
        """Rows `start:stop`, trimmed to their own longest row: one learner rank's share of a batch."""
        width = int(self.batch.lengths[start:stop].max())
        return self._map(lambda t: t[start:stop] if t.dim() == 1 else t[start:stop, :width],
                         self.batch.select(torch.arange(start, stop, device=self.batch.input_ids.device)))

    @staticmethod
    def concat(parts: list["Trajectories"], pad_id: int) -> "Trajectories":
        """One batch from chunks sampled apart: rows stacked, right-padded to the longest."""
        if len(parts) == 1:
            return parts[0]
        width = max(p.batch.input_ids.shape[1] for p in parts)

        def stack(tensors: list[torch.Tensor | None], fill) -> torch.Tensor | None:
            if tensors[0] is None:
                return None
            if tensors[0].dim() == 1:
                return torch.cat(tensors)
            return torch.cat([torch.nn.functional.pad(t, _right_pad(t, width), value=fill) for t in tensors])

        batch = LatentBatch(**{f.name: stack([getattr(p.batch, f.name) for p in parts],
                                             pad_id if f.name == "input_ids" else 0)
                               for f in fields(LatentBatch)})
        values = {name: stack([getattr(p, name) for p in parts], 0) for name in _per_row_fields()}
        return Trajectories(batch=batch, forward_passes=sum(p.forward_passes for p in parts), **values)

    def _map(self, change, batch: LatentBatch) -> "Trajectories":
        """A copy with `change` applied to every per-row tensor and `batch` in place of this one's."""
        values = {name: (None if getattr(self, name) is None else change(getattr(self, name)))
                  for name in _per_row_fields()}
        return replace(self, batch=batch, **values)


def _per_row_fields() -> list[str]:
    return [f.name for f in fields(Trajectories) if f.name not in ("batch", "forward_passes")]


def _right_pad(tensor: torch.Tensor, width: int) -> tuple[int, ...]:
    """`F.pad` widths that extend dim 1 of a (B, T, ...) tensor to `width`."""
    return (0, 0) * (tensor.dim() - 2) + (0, width - tensor.shape[1])
