"""The sampler's decoders: the model against a KV cache, behind one interface (`prefill`, `step`, `compact`;
`refills` says whether freed slots may take new prompts).

`SlotDecoder` runs against rlatent's preallocated `SlotCache` (packed prefills into any free slots, in-place
decode steps, optionally `torch.compile`d); `HFDecoder` against Hugging Face's own cache, for models whose
attention rlatent's cache does not cover (`LatentModel.kv_unsupported`). Neither knows about decisions,
latents or outputs: the sampler (`rlatent.latent.sampler`) hands them embeddings and positions.
"""

from __future__ import annotations

import warnings

import torch

from rlatent.model.kv_cache import RowLayout, SlotCache
from rlatent.model.latent_model import LatentModel


class SlotDecoder:
    """The model against rlatent's `SlotCache`: packed prefills into any free slots, in-place decode steps."""

    refills = True

    def __init__(self, model: LatentModel, slots: int, capacity: int, compile: bool):
        self.model, self.capacity = model, capacity
        self.cache = SlotCache(slots, capacity)
        self._step = self._eager_step
        if compile:
            try:
                self._step = torch.compile(self._eager_step, dynamic=False)
            except Exception as exc:  # noqa: BLE001 - eager is the documented fallback
                warnings.warn(f"sampler: torch.compile unavailable ({exc}); decoding eagerly")
        self._compiled = compile and self._step is not self._eager_step

    def prefill(self, slots: list[int], prompts: list[list[int]]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute `prompts` into `slots`; identical prompts are computed once. Returns the hidden state of each
        prompt's last position (k, H), the packed hidden states (N, H) and, for the k prompts one after
        another, the packed index of each of their positions (sum of lengths,)."""
        device = self.model.device
        unique: dict[tuple[int, ...], int] = {}
        which = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
        computed = [list(p) for p in unique]
        sizes = torch.tensor([len(p) for p in computed])
        offsets = sizes.cumsum(0) - sizes
        width = int(sizes.max())
        location = offsets[:, None] + torch.arange(width)[None, :]
        layout = RowLayout.build(torch.zeros_like(sizes), sizes, location, device)
        source = torch.cat([offsets[u] + torch.arange(int(sizes[u])) for u in which])
        slot = torch.cat([torch.full((int(sizes[u]),), s) for s, u in zip(slots, which)])
        position = torch.cat([torch.arange(int(sizes[u])) for u in which])
        ids = torch.tensor([t for p in computed for t in p], device=device)
        positions = torch.cat([torch.arange(int(n)) for n in sizes]).to(device)
        self.cache.prefill(layout, source.to(device), slot.to(device), position.to(device))
        hidden, _ = self.model.trunk(self.model.embed(ids)[None], None, positions[None],
                                     torch.zeros(1, ids.shape[0], dtype=torch.bool, device=device), cache=self.cache)
        hidden = hidden[0]
        last = (offsets + sizes - 1)[torch.tensor(which)].to(device)
        return hidden[last], hidden, source.to(device)

    def _eager_step(self, embeds: torch.Tensor, positions: torch.Tensor, latent: torch.Tensor, length: int
                    ) -> torch.Tensor:
        self.cache.decode(embeds.shape[0], positions, length)
        hidden, _ = self.model.trunk(embeds[:, None], None, positions[:, None], latent[:, None], cache=self.cache)
        return hidden[:, 0]

    def step(self, embeds: torch.Tensor, positions: torch.Tensor, latent: torch.Tensor, length: int) -> torch.Tensor:
        """One position for each of the first `len(positions)` slots; keys at columns < `length` are visible."""
        if self._compiled:
            try:
                return self._step(embeds, positions, latent, length)
            except Exception as exc:  # noqa: BLE001 - eager is the documented fallback
                warnings.warn(f"sampler: the compiled decode step failed ({type(exc).__name__}: {exc}); "
                              "decoding eagerly")
                self._compiled, self._step = False, self._eager_step
        return self._eager_step(embeds, positions, latent, length)

    def copy_prefix(self, destination: torch.Tensor, source: torch.Tensor, length: int) -> None:
        """Slots `destination` take the first `length` columns of slots `source` (a shared prompt, a moved row)."""
        self.cache.move(destination, source, length)

    def compact(self, destination: torch.Tensor, source: torch.Tensor, count: int, length: int) -> None:
        self.copy_prefix(destination, source, length)  # the first `count` slots stay in use; the rest idle


class HFDecoder:
    """The model against Hugging Face's own cache, for models rlatent's attention does not cover: every prompt
    in one left-padded prefill, then one column per step; no refills; finished rows leave the cache."""

    refills = False

    def __init__(self, model: LatentModel, slots: int):
        self.model, self.slots = model, slots
        self.cache, self.attention = None, None

    def prefill(self, slots: list[int], prompts: list[list[int]]):
        device = self.model.device
        assert slots == list(range(self.slots)) and self.cache is None, "Hugging Face caches are filled once"
        width = max(len(p) for p in prompts)
        left = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.bool)
        for b, prompt in enumerate(prompts):
            left[b, width - len(prompt):] = torch.tensor(prompt)
            mask[b, width - len(prompt):] = True
        left, mask = left.to(device), mask.to(device)
        positions = (mask.long().cumsum(1) - 1).clamp_min(0)
        hidden, self.cache = self.model.trunk(self.model.embed(left), mask, positions, torch.zeros_like(mask),
                                              use_cache=True)
        self.attention = mask
        source = torch.cat([b * width + torch.arange(width - len(p), width) for b, p in enumerate(prompts)])
        return hidden[:, -1], hidden.reshape(-1, hidden.shape[-1]), source.to(device)

    def compact(self, destination: torch.Tensor, source: torch.Tensor, count: int, length: int) -> None:
        keep = torch.arange(self.attention.shape[0], device=self.attention.device)
        keep[destination] = source
        keep = keep[:count]
        self.cache.batch_select_indices(keep)
        self.attention = self.attention[keep]

    def step(self, embeds, positions, latent, length):
        self.attention = torch.cat([self.attention, self.attention.new_ones(embeds.shape[0], 1)], 1)
        hidden, self.cache = self.model.trunk(embeds[:, None], self.attention, positions[:, None], latent[:, None],
                                              self.cache, use_cache=True)
        return hidden[:, 0]
