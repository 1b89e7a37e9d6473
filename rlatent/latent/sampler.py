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
forced and carries no log-probability (the rules: `rlatent.latent.decisions`).
The trajectories come back as the same
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
refills, finished rows dropped from the cache (the two decoders:
`rlatent.latent.decoders`).

**The code.** `sample` runs an `_Engine`, whose `run` loop reads top to bottom:
`admit_prompts` (refill free slots from the queue), `move_rows_forward` (once
the queue is empty), then `step`: the start/stop rules (`BlockRules.decide`),
`emit_token`, the counters advanced (`Counters`, one named (S,) tensor each),
`retire_finished`, `host_looks` (every `sync_every` steps) and `feed_next` (the
next position of every slot). `_Outputs` holds what is written and assembles
the `Trajectories`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from rlatent.config import EvalConfig, GRPOConfig, LatentConfig
from rlatent.latent.batch import LatentBatch
from rlatent.latent.decisions import BlockRules, Counters, Decisions, sample_tokens, stop_reached
from rlatent.latent.decoders import HFDecoder, SlotDecoder
from rlatent.latent.policy import chosen_logprobs, gaussian_logprob, precise_dtype, scaled_logits
from rlatent.latent.trajectory import Trajectories
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
    def from_config(cls, latent_cfg: LatentConfig, eval_cfg: EvalConfig, **overrides) -> "SamplingSettings":
        return cls(**{**dict(
            max_new_tokens=eval_cfg.max_new_tokens, temperature=eval_cfg.temperature, top_p=eval_cfg.top_p,
            decisions=eval_cfg.decisions, start_threshold=latent_cfg.start_threshold,
            stop_threshold=latent_cfg.stop_threshold, max_latents_per_block=latent_cfg.max_latents_per_block,
            max_blocks=latent_cfg.max_blocks, max_total_latents=latent_cfg.max_total_latents,
            compile=eval_cfg.compile), **overrides})

    @classmethod
    def for_rollouts(cls, latent_cfg: LatentConfig, grpo_cfg: GRPOConfig) -> "SamplingSettings":
        """GRPO's rollouts: sampled decisions, the `grpo` section's temperature, top-p and noise, the `latent`
        section's caps."""
        g = grpo_cfg
        return cls(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, decisions="sample",
                   max_latents_per_block=latent_cfg.max_latents_per_block, max_blocks=latent_cfg.max_blocks,
                   max_total_latents=latent_cfg.max_total_latents, latent_noise_std=g.latent_noise_std,
                   slots=g.slots, compile=g.compile)

    @property
    def logprob_temperature(self) -> float:
        return self.temperature if self.temperature > 0 else 1.0


# ---- the outputs ----------------------------------------------------------------------------------------


@dataclass
class _Outputs:
    """The trajectories being written, (rows + 1, capacity) each: one row per prompt plus the spare row that
    finished rows and idle slots write to (dropped by `trajectories`)."""

    ids: torch.Tensor
    prompt_lengths: torch.Tensor  # (rows + 1,)
    latent: torch.Tensor
    token_lp: torch.Tensor
    start_lp: torch.Tensor
    stop_lp: torch.Tensor
    latent_lp: torch.Tensor
    start_decided: torch.Tensor
    stop_decided: torch.Tensor
    slot_inputs: torch.Tensor  # (rows + 1, capacity, H)
    hidden: torch.Tensor | None  # like slot_inputs, with `record_hidden`
    lengths: torch.Tensor  # (rows + 1,)
    finished: torch.Tensor  # (rows + 1,)

    @classmethod
    def allocate(cls, prompts: list[list[int]], pad_id: int, capacity: int, model: LatentModel,
                 record_hidden: bool) -> "_Outputs":
        device, dtype, rows = model.device, model.dtype, len(prompts)
        ids = torch.full((rows + 1, capacity), pad_id, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, : len(prompt)] = torch.tensor(prompt)
        prompt_lengths = torch.tensor([len(p) for p in prompts] + [1], device=device)

        def zeros(dtype: torch.dtype, *size: int) -> torch.Tensor:
            return torch.zeros(rows + 1, *size, dtype=dtype, device=device)

        precise = precise_dtype(dtype)
        slot_inputs = zeros(dtype, capacity, model.hidden_size)
        return cls(ids=ids.to(device), prompt_lengths=prompt_lengths, latent=zeros(torch.bool, capacity),
                   token_lp=zeros(precise, capacity), start_lp=zeros(precise, capacity),
                   stop_lp=zeros(precise, capacity), latent_lp=zeros(precise, capacity),
                   start_decided=zeros(torch.bool, capacity), stop_decided=zeros(torch.bool, capacity),
                   slot_inputs=slot_inputs, hidden=torch.zeros_like(slot_inputs) if record_hidden else None,
                   lengths=prompt_lengths.clone(), finished=zeros(torch.bool))

    def record_decisions(self, row: torch.Tensor, pos: torch.Tensor, decisions: Decisions) -> None:
        """The start and stop decisions taken at positions `pos` (A,) of rows `row` (A,)."""
        if decisions.start_logprob is not None:
            self.start_lp[row, pos] = decisions.start_logprob.to(self.start_lp.dtype)
            self.start_decided[row, pos] = decisions.start_decided
            self.stop_lp[row, pos] = decisions.stop_logprob.to(self.stop_lp.dtype)
            self.stop_decided[row, pos] = decisions.stop_decided

    def trajectories(self, forward_passes: int) -> Trajectories:
        """The prompts' rows, cut to the longest: the `LatentBatch` the training forward takes and its log-probs."""
        rows = self.ids.shape[0] - 1
        used = int(self.lengths[:rows].max())
        attention_mask = torch.arange(used, device=self.ids.device)[None, :] < self.lengths[:rows, None]
        batch = LatentBatch(self.ids[:rows, :used], self.latent[:rows, :used], attention_mask,
                            self.prompt_lengths[:rows])
        return Trajectories(
            batch=batch, token_logprobs=self.token_lp[:rows, :used], start_logprobs=self.start_lp[:rows, :used],
            start_decided=self.start_decided[:rows, :used], stop_logprobs=self.stop_lp[:rows, :used],
            stop_decided=self.stop_decided[:rows, :used], latent_logprobs=self.latent_lp[:rows, :used],
            slot_inputs=self.slot_inputs[:rows, :used], finished=self.finished[:rows],
            hidden=None if self.hidden is None else self.hidden[:rows, :used], forward_passes=forward_passes,
        )


# ---- the scheduler --------------------------------------------------------------------------------------


@torch.no_grad()
def sample(model: LatentModel, prompts: list[list[int]], eos_id: int, pad_id: int,
           settings: SamplingSettings) -> Trajectories:
    """Complete each prompt; see the module docstring for the decision rules and the engine."""
    return _Engine(model, prompts, eos_id, pad_id, settings).run()


class _Engine:
    """One call of `sample`: the slots and their device state, the queue, what the host knows, the outputs.

    `run` reads top to bottom: admit queued prompts into free slots, move the last rows forward once the
    queue is empty, then one step for every live row (decide, emit, retire, feed the next position)."""

    def __init__(self, model: LatentModel, prompts: list[list[int]], eos_id: int, pad_id: int,
                 settings: SamplingSettings):
        device = model.device
        self.model, self.prompts, self.eos_id, self.pad_id, self.settings = model, prompts, eos_id, pad_id, settings
        rows = len(prompts)
        own_cache = model.kv_unsupported is None
        self.slots = rows if settings.slots is None or not own_cache else max(1, min(settings.slots, rows))
        self.static = settings.compile and own_cache  # every step computes every slot at full capacity
        self.sync_every = settings.sync_every or (1 if device.type == "cpu" else 8)
        self.capacity = max(len(p) for p in prompts) + settings.max_new_tokens + settings.max_total_latents + 1
        self.spare = rows  # the output row that finished and idle slots write to (dropped at the end)
        self.decoder = (SlotDecoder(model, self.slots, self.capacity, settings.compile) if own_cache
                        else HFDecoder(model, self.slots))
        self.out = _Outputs.allocate(prompts, pad_id, self.capacity, model, settings.record_hidden)
        self.stops = [torch.tensor(s, device=device) for s in settings.stop_sequences if s]
        self.rules = BlockRules(
            cap=model.settings.k if model.latent_mode.fixed_block_length else settings.max_latents_per_block,
            max_blocks=settings.max_blocks, max_total_latents=settings.max_total_latents,
            start_threshold=settings.start_threshold, stop_threshold=settings.stop_threshold,
            sampled=settings.decisions == "sample")

        # Per-slot state, on the device.
        self.slot_row = torch.full((self.slots,), self.spare, dtype=torch.long, device=device)
        self.position = torch.zeros(self.slots, dtype=torch.long, device=device)  # the last computed position
        self.counters = Counters.zeros(self.slots, device)
        self.h = torch.zeros(self.slots, model.hidden_size, device=device, dtype=model.dtype)
        # What the host knows: the row each slot holds (None = free) and each slot's position (for the key length).
        self.queue = deque(range(rows))
        self.keys = [tuple(p) for p in prompts]
        self.prompt_state: dict[tuple[int, ...], torch.Tensor] = {}  # each prefilled prompt's last hidden state
        self.held: list[int | None] = [None] * self.slots
        self.at: list[int] = [0] * self.slots
        self.computed = 0  # slots 0..computed-1 run each step
        self.forward_passes, self.steps = 0, 0
        self.order, self.stale = None, True  # (A,) the slots of the live rows in row order: the draws' order

    def run(self) -> Trajectories:
        while True:
            self.admit_prompts()
            live = self.live_slots()
            if not live:
                break
            if not self.static and not self.queue and len(live) < self.computed:
                self.move_rows_forward(live)
            if self.stale:
                self.stale = False
                self.order = torch.tensor(sorted(self.live_slots(), key=lambda s: self.held[s]),
                                          device=self.model.device)
            if not self.step():
                break
        return self.out.trajectories(self.forward_passes)

    # -- the host's scheduling

    def live_slots(self) -> list[int]:
        return [s for s in range(self.slots) if self.held[s] is not None]

    def admit_prompts(self) -> None:
        """Refill free slots from the queue (on the HF cache: all rows once, at the start). A prompt some live
        slot already holds (the rest of a GRPO group) is copied from that slot, not computed."""
        free = [s for s in range(self.slots) if self.held[s] is None]
        if not (self.queue and free and (self.decoder.refills or self.forward_passes == 0)):
            return
        take = free[: len(self.queue)]
        new = [self.queue.popleft() for _ in take]
        donors = {self.keys[r]: s for s, r in reversed(list(enumerate(self.held))) if r is not None}  # lowest wins
        fresh = [(s, r) for s, r in zip(take, new) if self.keys[r] not in donors]
        copied = [(s, r, donors[self.keys[r]]) for s, r in zip(take, new) if self.keys[r] in donors]
        if fresh:
            self._prefill(fresh)
        if copied:
            self._copy_from_donors(copied)
        device = self.model.device
        take_d, new_d = torch.tensor(take, device=device), torch.tensor(new, device=device)
        self.slot_row[take_d] = new_d
        self.position[take_d] = self.out.prompt_lengths[new_d] - 1
        self.counters[take_d] = 0
        self.h[take_d] = torch.stack([self.prompt_state[self.keys[r]] for r in new])
        for s, r in zip(take, new):
            self.held[s], self.at[s] = r, len(self.prompts[r]) - 1
        self.computed = max(self.computed, max(take) + 1)
        self.stale = True

    def _prefill(self, fresh: list[tuple[int, int]]) -> None:
        """Compute the prompts of rows `r` into slots `s`, for each (s, r) of `fresh`."""
        device, prompts = self.model.device, self.prompts
        last, hidden, source = self.decoder.prefill([s for s, _ in fresh], [prompts[r] for _, r in fresh])
        self.forward_passes += 1
        for (_, r), state in zip(fresh, last.to(self.model.dtype)):
            self.prompt_state[self.keys[r]] = state
        if self.out.hidden is not None:
            rows_of = torch.cat([torch.full((len(prompts[r]),), r) for _, r in fresh]).to(device)
            positions_of = torch.cat([torch.arange(len(prompts[r])) for _, r in fresh]).to(device)
            self.out.hidden[rows_of, positions_of] = hidden[source].to(self.model.dtype)

    def _copy_from_donors(self, copied: list[tuple[int, int, int]]) -> None:
        """Slot `s` takes row `r`'s prompt from the slot `d` that holds it, for each (s, r, d) of `copied`."""
        device, prompts = self.model.device, self.prompts
        width = max(len(prompts[r]) for _, r, _ in copied)
        self.decoder.copy_prefix(torch.tensor([s for s, _, _ in copied], device=device),
                                 torch.tensor([d for _, _, d in copied], device=device), width)
        if self.out.hidden is not None:
            for _, r, donor in copied:
                self.out.hidden[r, : len(prompts[r])] = self.out.hidden[self.held[donor], : len(prompts[r])]

    def move_rows_forward(self, live: list[int]) -> None:
        """The queue is empty: move the rows of the last slots into the holes before them, so that the first
        `len(live)` slots hold every live row and the computed width shrinks."""
        device, held, at = self.model.device, self.held, self.at
        holes = [s for s in range(len(live)) if held[s] is None]
        movers = [s for s in live if s >= len(live)]
        destination = torch.tensor(holes, dtype=torch.long, device=device)
        source = torch.tensor(movers, dtype=torch.long, device=device)
        self.decoder.compact(destination, source, len(live), max([at[s] for s in movers], default=0) + 1)
        if movers:
            for tensor in (self.slot_row, self.position, self.h):
                tensor[destination] = tensor[source]
            self.counters[destination] = self.counters[source]
            for d, s in zip(holes, movers):
                held[d], at[d], held[s] = held[s], at[s], None
        self.computed = len(live)
        self.stale = True

    def host_looks(self) -> bool:
        """Every `sync_every` steps the host reads which slots their rows left; False once nothing is left."""
        self.steps += 1
        if self.steps % self.sync_every:
            return True
        count = self.slots if self.static else self.computed
        holding = self.slot_row[:count].tolist()
        for s in range(count):
            if self.held[s] is not None and holding[s] == self.spare:
                self.held[s], self.stale = None, True
        return bool(self.queue) or any(r is not None for r in self.held)

    # -- one step, on the device

    def step(self) -> bool:
        """One position for every live row, in row order; False when the host finds nothing left to compute."""
        out, order = self.out, self.order
        row, pos, state = self.slot_row[order], self.position[order], self.h[order]
        counters = self.counters[order]
        decisions = self.rules.decide(self.model, state, counters)
        out.record_decisions(row, pos, decisions)
        go_latent = decisions.go_latent
        token, following, logits = self.emit_token(row, pos, state, go_latent)
        after = counters.after(go_latent)
        self.counters[order] = after
        ended = self.retire_finished(row, following, token, ~go_latent, after.tokens)
        row = torch.where(ended, self.spare, row)
        self.slot_row[order] = row
        if not self.host_looks():
            return False
        self.feed_next(row, following, state, logits, token, go_latent, counters.block_length, ended)
        return True

    def emit_token(self, row, pos, state, go_latent) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A token from each row's state, written at the next position of the rows that continue in language
        (a latent slot for the others); returns the tokens (A,), the next positions (A,) and the logits (A, V),
        which `feed_next`'s projection reads again."""
        out, settings = self.out, self.settings
        logits = self.model.token_logits(state)  # (A, V)
        scaled = scaled_logits(logits, settings.logprob_temperature)
        token = sample_tokens(scaled, settings.temperature, settings.top_p)
        logprob = chosen_logprobs(scaled, token)
        following = (pos + 1).clamp(max=self.capacity - 1)  # (only a finished row's slot would run past the end)
        speaks = ~go_latent
        out.ids[row, following] = torch.where(speaks, token, self.pad_id)
        out.token_lp[row, following] = torch.where(speaks, logprob.to(out.token_lp.dtype), 0.0)
        out.latent[row, following] = go_latent
        out.lengths[row] = following + 1
        return token, following, logits

    def retire_finished(self, row, following, token, speaks, tokens) -> torch.Tensor:
        """(A,) the rows that end here: they emitted EOS or a stop sequence (finished), or ran out of tokens."""
        out = self.out
        done = (token == self.eos_id) | stop_reached(out.ids, row, following, out.prompt_lengths, self.stops)
        ended = speaks & (done | (tokens >= self.settings.max_new_tokens))
        out.finished[row] = out.finished[row] | (ended & done)
        return ended

    def feed_next(self, row, following, state, logits, token, go_latent, index_in_block, ended) -> None:
        """Compute the next position of every slot: a token's embedding, or a latent input (a pause slot's by
        its `index_in_block`; else `proj(h)`, with exploration noise and its log-density). `row` is the spare
        row where a row ended."""
        model, settings, out, device = self.model, self.settings, self.out, self.model.device
        if model.latent_mode.slot_input == "pause":
            latent_input = model.pause_inputs(torch.where(go_latent, index_in_block, 0))
        else:
            latent_input = model.latent_inputs(state, logits)
            if settings.latent_noise_std > 0:
                mean = latent_input
                if self.sync_every == 1:  # draws for the rows that go on only (the host looks at them every step)
                    going = (~ended).nonzero().flatten()
                    noise = torch.zeros_like(mean).index_copy_(0, going, torch.randn(
                        going.shape[0], mean.shape[1], device=device, dtype=mean.dtype))
                else:
                    noise = torch.randn_like(mean)
                latent_input = mean + settings.latent_noise_std * noise
                density = gaussian_logprob(latent_input, mean, settings.latent_noise_std).to(out.latent_lp.dtype)
                out.latent_lp[row, following] = torch.where(go_latent, density, 0.0)
        embeds = torch.where(go_latent[:, None], latent_input, model.embed(token))  # (A, H)
        out.slot_inputs[row, following] = torch.where(go_latent[:, None], embeds, 0.0)
        # Per slot (a free slot among the first `count` computes garbage nobody reads).
        count = self.slots if self.static else self.computed
        order = self.order
        slot_embeds = embeds.new_zeros(count, embeds.shape[1]).index_copy_(0, order, embeds)
        slot_latent = torch.zeros(count, dtype=torch.bool, device=device).index_copy_(0, order, go_latent)
        slot_following = (self.position[:count] + 1).clamp(max=self.capacity - 1)
        for s in range(count):
            self.at[s] = min(self.at[s] + 1, self.capacity - 1)
        length = self.capacity if self.static else max(self.at[:count]) + 1
        stepped = self.decoder.step(slot_embeds, slot_following, slot_latent, length)
        self.forward_passes += 1
        self.h[:count] = stepped
        self.position[:count] = slot_following
        if out.hidden is not None:
            out.hidden[row, following] = stepped[order]
