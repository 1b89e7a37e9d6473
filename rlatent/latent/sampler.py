"""Batched, KV-cached, latent-aware sampling.

Every row is in language or latent mode at each step. After computing a
position, a row decides on its hidden state `h`:

- language position: the start head decides whether to open a block. Open:
  the next position is a latent slot with input `proj(h)`. Closed: a token is
  drawn from the LM head on `h`.
- latent slot: the stop head decides whether the block ends. Continue: the
  next position is another latent slot. Stop: a token is drawn from `h`.

Decisions are thresholded (`greedy`) or drawn from a Bernoulli (`sample`). At a
cap (latents per block, blocks per answer, total latents) the decision is
forced and carries no log-probability. The trajectories come back as the same
right-padded `LatentBatch` the training forward takes, with every
log-probability aligned to the position where it was taken, so that recomputing
them is a comparison of two tensors (the invariant).

**The engine.** A fixed number of *slots* (`SamplingSettings.slots`, default:
every prompt at once) each hold one row; a queue of prompts refills a slot as
soon as its row finishes (continuous batching), so a slow row never holds the
others up. The KV cache is preallocated (`SlotCache`: slots x capacity per
layer) and written in place; prompts are prefilled packed, identical prompts
(a GRPO group) are computed once, and a queued prompt that a live slot already
holds is copied from that slot instead of computed. Each step computes one
position for each of the first `A` slots. The bookkeeping (positions, block
and latent counts, which row a slot holds) lives in device tensors and every
write into the outputs is an index write, so a step needs no host
synchronisation; the host reads which rows finished every `sync_every` steps
(every step on a CPU, where that costs nothing), refills their slots and, once
the queue is empty, moves the last rows into the freed slots so that `A`
shrinks with the work left (not with `compile`, which keeps every shape
static). Until the host has looked, a finished row's slot computes garbage
that is written to a spare output row, dropped at the end.

Random draws (Bernoulli decisions, multinomial tokens, exploration noise) are
taken over the live rows in row order, as the sampler always did, so a seeded
run is reproducible and, with the default settings (every prompt in a slot,
`sync_every` 1), draws exactly what the sampler drew before it had slots.

Models whose attention rlatent's cache does not cover (`LatentModel.kv_unsupported`)
run against Hugging Face's cache: every prompt in one left-padded prefill, no
refills, finished rows dropped from the cache.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass

import torch

from rlatent.latent.batch import LatentBatch
from rlatent.latent.policy import decision_logprobs, gaussian_logprob, precise_dtype, scaled_logits, token_logprobs
from rlatent.latent.trajectory import Trajectories
from rlatent.model.kv_cache import RowLayout, SlotCache
from rlatent.model.latent_model import LatentModel


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy tokens; log-probs are then taken at temperature 1
    top_p: float = 1.0
    decisions: str = "greedy"  # or "sample"
    start_threshold: float = 0.5
    stop_threshold: float = 0.5
    max_latents_per_block: int = 8
    max_blocks: int = 16
    max_total_latents: int = 64
    latent_noise_std: float = 0.0  # Gaussian exploration on latents: z ~ N(proj(h), std^2 I)
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # a row ends (finished) once its tokens end with one of these
    record_hidden: bool = False
    slots: int | None = None  # rows computed at once; fewer than the prompts: the rest wait in a queue. None = all
    compile: bool = False  # torch.compile the decode step (static shapes); eager when compiling fails
    sync_every: int | None = None  # steps between the host's looks at finished rows; None = 1 on CPU, 8 on GPU

    @classmethod
    def from_config(cls, latent_cfg, eval_cfg, **overrides) -> "SamplingSettings":
        return cls(**{**dict(
            max_new_tokens=eval_cfg.max_new_tokens, temperature=eval_cfg.temperature, top_p=eval_cfg.top_p,
            decisions=eval_cfg.decisions, start_threshold=latent_cfg.start_threshold,
            stop_threshold=latent_cfg.stop_threshold, max_latents_per_block=latent_cfg.max_latents_per_block,
            max_blocks=latent_cfg.max_blocks, max_total_latents=latent_cfg.max_total_latents,
            compile=eval_cfg.compile), **overrides})

    @classmethod
    def for_rollouts(cls, cfg) -> "SamplingSettings":
        """GRPO's rollouts: sampled decisions, the `grpo` section's temperature, top-p, caps and noise."""
        g = cfg.grpo
        return cls(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, decisions="sample",
                   max_latents_per_block=cfg.latent.max_latents_per_block, max_blocks=cfg.latent.max_blocks,
                   max_total_latents=cfg.latent.max_total_latents, latent_noise_std=g.latent_noise_std,
                   slots=g.slots, compile=g.compile)

    @property
    def logprob_temperature(self) -> float:
        return self.temperature if self.temperature > 0 else 1.0


def sample_tokens(scaled: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(N, V) logits at the sampling temperature (`policy.scaled_logits`) -> (N,) tokens: argmax at
    temperature 0, else nucleus sampling."""
    if temperature == 0:
        return scaled.argmax(-1)
    probs = torch.softmax(scaled, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        return order.gather(-1, torch.multinomial(sorted_probs, 1)).squeeze(-1)
    return torch.multinomial(probs, 1).squeeze(-1)


def _decide(logits: torch.Tensor, threshold: float, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary decisions from logits; returns (decision bool, its log-prob)."""
    if sample:
        decision = torch.bernoulli(torch.sigmoid(logits.double())).bool()
    else:
        decision = torch.sigmoid(logits) > threshold
    return decision, decision_logprobs(logits, decision)


def stop_reached(ids: torch.Tensor, active: torch.Tensor, position: torch.Tensor, prompt_lengths: torch.Tensor,
                 stops: list[torch.Tensor]) -> torch.Tensor:
    """(A,) True where the completion of row `active[i]` ends at `position[i]` with one of `stops` (token-id
    sequences; a latent slot in between breaks the match, since its id is the pad id)."""
    hit = torch.zeros_like(active, dtype=torch.bool)
    for stop in stops:
        back = torch.arange(len(stop) - 1, -1, -1, device=ids.device)
        index = position[:, None] - back[None, :]  # (A, L): the last L positions
        inside = (index >= prompt_lengths[active][:, None]).all(-1)
        hit |= inside & (ids[active[:, None], index.clamp_min(0)] == stop).all(-1)
    return hit


# ---- decoders: the model against a cache ---------------------------------------------------------------


class _SlotDecoder:
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


class _HFDecoder:
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


# ---- the sampler ----------------------------------------------------------------------------------------


@torch.no_grad()
def sample(model: LatentModel, prompts: list[list[int]], eos_id: int, pad_id: int,
           settings: SamplingSettings) -> Trajectories:
    """Complete each prompt; see the module docstring for the decision rules and the engine."""
    device, dtype, mode = model.device, model.dtype, model.latent_mode
    rows = len(prompts)
    own_cache = model.kv_unsupported is None
    slots = rows if settings.slots is None or not own_cache else max(1, min(settings.slots, rows))
    static = settings.compile and own_cache  # every step computes every slot at full capacity
    sync_every = settings.sync_every or (1 if device.type == "cpu" else 8)
    width = max(len(p) for p in prompts)
    capacity = width + settings.max_new_tokens + settings.max_total_latents + 1
    spare = rows  # the output row that finished and idle slots write to (dropped at the end)
    decoder = _SlotDecoder(model, slots, capacity, settings.compile) if own_cache else _HFDecoder(model, slots)

    # Outputs, one row per prompt plus the spare.
    precise = precise_dtype(dtype)
    prompt_lengths_host = [len(p) for p in prompts] + [1]
    ids_host = torch.full((rows + 1, capacity), pad_id, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids_host[b, : len(prompt)] = torch.tensor(prompt)
    ids = ids_host.to(device)
    prompt_lengths = torch.tensor(prompt_lengths_host, device=device)
    latent = torch.zeros(rows + 1, capacity, dtype=torch.bool, device=device)
    token_lp, start_lp, stop_lp, latent_lp = (torch.zeros(rows + 1, capacity, device=device, dtype=precise)
                                              for _ in range(4))
    start_dec, stop_dec = (torch.zeros(rows + 1, capacity, dtype=torch.bool, device=device) for _ in range(2))
    slot_inputs = torch.zeros(rows + 1, capacity, model.hidden_size, device=device, dtype=dtype)
    hidden_out = torch.zeros_like(slot_inputs) if settings.record_hidden else None
    lengths = prompt_lengths.clone()
    finished = torch.zeros(rows + 1, dtype=torch.bool, device=device)

    # Per-slot state, on the device.
    slot_row = torch.full((slots,), spare, dtype=torch.long, device=device)
    position = torch.zeros(slots, dtype=torch.long, device=device)  # index of the slot's last computed position
    counters = torch.zeros(5, slots, dtype=torch.long, device=device)  # in block, block length, blocks, latents, tokens
    h = torch.zeros(slots, model.hidden_size, device=device, dtype=dtype)
    # What the host knows: the row each slot holds (None = free) and each slot's position (for the key length).
    queue = deque(range(rows))
    keys = [tuple(p) for p in prompts]
    prompt_state: dict[tuple[int, ...], torch.Tensor] = {}  # each prefilled prompt's last hidden state
    held: list[int | None] = [None] * slots
    at: list[int] = [0] * slots
    computed = 0  # slots 0..computed-1 run each step
    forward_passes, steps = 0, 0
    sample_decisions = settings.decisions == "sample"
    stops = [torch.tensor(s, device=device) for s in settings.stop_sequences if s]
    cap = model.settings.k if mode.fixed_block_length else settings.max_latents_per_block

    order, stale = None, True  # (A,) the slots of the live rows in row order: the order of every step's draws
    while True:
        # Refill free slots from the queue (on the HF cache: all rows once, at the start).
        free = [s for s in range(slots) if held[s] is None]
        if queue and free and (decoder.refills or forward_passes == 0):
            take = free[: len(queue)]
            new = [queue.popleft() for _ in take]
            # A prompt some live slot already holds (the rest of a GRPO group) is copied from that slot, not computed.
            donors = {keys[r]: s for s, r in reversed(list(enumerate(held))) if r is not None}  # lowest slot wins
            copied = [(s, r, donors[keys[r]]) for s, r in zip(take, new) if keys[r] in donors]
            fresh = [(s, r) for s, r in zip(take, new) if keys[r] not in donors]
            if fresh:
                last, hidden, source = decoder.prefill([s for s, _ in fresh], [prompts[r] for _, r in fresh])
                forward_passes += 1
                for (_, r), state in zip(fresh, last.to(dtype)):
                    prompt_state[keys[r]] = state
                if hidden_out is not None:
                    rows_of = torch.cat([torch.full((len(prompts[r]),), r) for _, r in fresh]).to(device)
                    positions_of = torch.cat([torch.arange(len(prompts[r])) for _, r in fresh]).to(device)
                    hidden_out[rows_of, positions_of] = hidden[source].to(dtype)
            if copied:
                width_copied = max(len(prompts[r]) for _, r, _ in copied)
                decoder.copy_prefix(torch.tensor([s for s, _, _ in copied], device=device),
                                    torch.tensor([d for _, _, d in copied], device=device), width_copied)
                if hidden_out is not None:
                    for _, r, donor in copied:
                        hidden_out[r, : len(prompts[r])] = hidden_out[held[donor], : len(prompts[r])]
            take_d, new_d = torch.tensor(take, device=device), torch.tensor(new, device=device)
            slot_row[take_d] = new_d
            position[take_d] = prompt_lengths[new_d] - 1
            counters[:, take_d] = 0
            h[take_d] = torch.stack([prompt_state[keys[r]] for r in new])
            for s, r in zip(take, new):
                held[s], at[s] = r, len(prompts[r]) - 1
            computed = max(computed, max(take) + 1)
            stale = True
        live = [s for s in range(slots) if held[s] is not None]
        if not live:
            break
        if not static and not queue and len(live) < computed:  # the queue is empty: move the last rows forward
            holes = [s for s in range(len(live)) if held[s] is None]
            movers = [s for s in live if s >= len(live)]
            destination = torch.tensor(holes, dtype=torch.long, device=device)
            source_slots = torch.tensor(movers, dtype=torch.long, device=device)
            decoder.compact(destination, source_slots, len(live), max([at[s] for s in movers], default=0) + 1)
            if movers:
                for tensor in (slot_row, position, h):
                    tensor[destination] = tensor[source_slots]
                counters[:, destination] = counters[:, source_slots]
                for d, s in zip(holes, movers):
                    held[d], at[d], held[s] = held[s], at[s], None
            computed = len(live)
            live = list(range(computed))
            stale = True
        if stale:
            stale = False
            order = torch.tensor(sorted(live, key=lambda s: held[s]), device=device)
        count = slots if static else computed

        # 1. Decisions on the state of each live row's last position, in row order.
        row, pos, state = slot_row[order], position[order], h[order]
        in_block, block_len, blocks, total, tokens = counters[:, order]
        in_latent = in_block.bool()
        go_latent = torch.zeros_like(in_latent)
        if mode.has_slots:
            can_open = ~in_latent & (blocks < settings.max_blocks) & (total < settings.max_total_latents)
            opened, lp = _decide(model.start_logits(state), settings.start_threshold, sample_decisions)
            start_lp[row, pos] = torch.where(can_open, lp, 0.0).to(precise)
            start_dec[row, pos] = can_open
            must_stop = in_latent & ((block_len >= cap) | (total >= settings.max_total_latents))
            free_stop = in_latent & ~must_stop & mode.has_stop_decisions
            stopped, lp = _decide(model.stop_logits(state), settings.stop_threshold, sample_decisions)
            stop_lp[row, pos] = torch.where(free_stop, lp, 0.0).to(precise)
            stop_dec[row, pos] = free_stop
            keeps_going = ~stopped if mode.has_stop_decisions else torch.ones_like(stopped)
            go_latent = (can_open & opened) | (in_latent & ~must_stop & keeps_going)

        # 2. A token for rows that continue in language.
        logits = model.token_logits(state)  # (A, V)
        token = sample_tokens(scaled_logits(logits, settings.logprob_temperature), settings.temperature, settings.top_p)
        logprob = token_logprobs(logits, token, settings.logprob_temperature)
        following = (pos + 1).clamp(max=capacity - 1)  # (only a finished row's slot would run past the end)
        speaks = ~go_latent
        ids[row, following] = torch.where(speaks, token, pad_id)
        token_lp[row, following] = torch.where(speaks, logprob.to(precise), 0.0)
        latent[row, following] = go_latent
        lengths[row] = following + 1
        tokens = tokens + speaks.long()
        counters[:, order] = torch.stack([go_latent.long(), torch.where(go_latent, block_len + 1, 0),
                                          blocks + (go_latent & ~in_latent).long(), total + go_latent.long(), tokens])

        # 3. Rows that emitted EOS or a stop sequence, or ran out of tokens, leave their slots.
        done = (token == eos_id) | stop_reached(ids, row, following, prompt_lengths, stops)
        ended = speaks & (done | (tokens >= settings.max_new_tokens))
        finished[row] = finished[row] | (ended & done)
        row = torch.where(ended, spare, row)
        slot_row[order] = row
        steps += 1
        if steps % sync_every == 0:  # the host looks at which slots are free
            holding = slot_row[:count].tolist()
            for s in range(count):
                if held[s] is not None and holding[s] == spare:
                    held[s], stale = None, True
            if not queue and all(r is None for r in held):
                break  # nothing left to compute

        # 4. One new position per slot: a token embedding or a latent input.
        if mode.slot_input == "pause":
            latent_input = model.pause_inputs(torch.where(go_latent, block_len, 0))
        else:
            latent_input = model.latent_inputs(state)
            if settings.latent_noise_std > 0:
                mean = latent_input
                if sync_every == 1:  # draws for the rows that go on only (the host looks at them every step anyway)
                    going = (~ended).nonzero().flatten()
                    noise = torch.zeros_like(mean).index_copy_(0, going, torch.randn(
                        going.shape[0], mean.shape[1], device=device, dtype=mean.dtype))
                else:
                    noise = torch.randn_like(mean)
                latent_input = mean + settings.latent_noise_std * noise
                density = gaussian_logprob(latent_input, mean, settings.latent_noise_std).to(precise)
                latent_lp[row, following] = torch.where(go_latent, density, 0.0)
        embeds = torch.where(go_latent[:, None], latent_input, model.embed(token))  # (A, H)
        slot_inputs[row, following] = torch.where(go_latent[:, None], embeds, 0.0)
        # Per slot (a free slot among the first `count` computes garbage nobody reads).
        slot_embeds = embeds.new_zeros(count, embeds.shape[1]).index_copy_(0, order, embeds)
        slot_latent = torch.zeros(count, dtype=torch.bool, device=device).index_copy_(0, order, go_latent)
        slot_following = (position[:count] + 1).clamp(max=capacity - 1)
        for s in range(count):
            at[s] = min(at[s] + 1, capacity - 1)
        length = capacity if static else max(at[:count]) + 1
        stepped = decoder.step(slot_embeds, slot_following, slot_latent, length)
        forward_passes += 1
        h[:count] = stepped
        position[:count] = slot_following
        if hidden_out is not None:
            hidden_out[row, following] = stepped[order]


    used = int(lengths[:rows].max())
    attention_mask = torch.arange(used, device=device)[None, :] < lengths[:rows, None]
    batch = LatentBatch(ids[:rows, :used], latent[:rows, :used], attention_mask, prompt_lengths[:rows])
    return Trajectories(
        batch=batch, token_logprobs=token_lp[:rows, :used], start_logprobs=start_lp[:rows, :used],
        start_decided=start_dec[:rows, :used], stop_logprobs=stop_lp[:rows, :used],
        stop_decided=stop_dec[:rows, :used], latent_logprobs=latent_lp[:rows, :used],
        slot_inputs=slot_inputs[:rows, :used], finished=finished[:rows],
        hidden=None if hidden_out is None else hidden_out[:rows, :used], forward_passes=forward_passes,
    )
