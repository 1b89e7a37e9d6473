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
forced and carries no log-probability. Each step runs one position per
unfinished row against the cache; finished rows are dropped from the cache, so
they stop costing compute. The trajectories come back as the same right-padded
`LatentBatch` the training forward takes, with every log-probability aligned to
the position where it was taken, so that recomputing them is a comparison of
two tensors (the invariant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlatent.latent.batch import LatentBatch
from rlatent.latent.policy import decision_logprobs, gaussian_logprob, precise_dtype, scaled_logits, token_logprobs
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

    @classmethod
    def from_config(cls, latent_cfg, eval_cfg, **overrides) -> "SamplingSettings":
        values = dict(
            max_new_tokens=eval_cfg.max_new_tokens, temperature=eval_cfg.temperature, top_p=eval_cfg.top_p,
            decisions=eval_cfg.decisions, start_threshold=latent_cfg.start_threshold,
            stop_threshold=latent_cfg.stop_threshold, max_latents_per_block=latent_cfg.max_latents_per_block,
            max_blocks=latent_cfg.max_blocks, max_total_latents=latent_cfg.max_total_latents,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def for_rollouts(cls, cfg) -> "SamplingSettings":
        """GRPO's rollouts: sampled decisions, the `grpo` section's temperature, top-p, caps and noise."""
        g = cfg.grpo
        return cls(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, decisions="sample",
                   max_latents_per_block=cfg.latent.max_latents_per_block, max_blocks=cfg.latent.max_blocks,
                   max_total_latents=cfg.latent.max_total_latents, latent_noise_std=g.latent_noise_std)

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


@torch.no_grad()
def sample(model: LatentModel, prompts: list[list[int]], eos_id: int, pad_id: int,
           settings: SamplingSettings) -> Trajectories:
    """Complete each prompt; see the module docstring for the decision rules."""
    device, dtype, mode = model.device, model.dtype, model.latent_mode
    rows = len(prompts)
    prompt_lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(prompt_lengths.max())
    capacity = width + settings.max_new_tokens + settings.max_total_latents + 1
    ids = torch.full((rows, capacity), pad_id, dtype=torch.long, device=device)
    latent = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
    precise = precise_dtype(dtype)
    token_lp, start_lp, stop_lp, latent_lp = (torch.zeros(rows, capacity, device=device, dtype=precise)
                                              for _ in range(4))
    start_dec, stop_dec = (torch.zeros(rows, capacity, dtype=torch.bool, device=device) for _ in range(2))
    slot_inputs = torch.zeros(rows, capacity, model.hidden_size, device=device, dtype=dtype)
    hidden_out = torch.zeros_like(slot_inputs) if settings.record_hidden else None

    # Prefill: prompts left-padded so every row's last prompt state sits in the last column.
    left = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    left_mask = torch.zeros(rows, width, dtype=torch.bool, device=device)
    for b, prompt in enumerate(prompts):
        ids[b, : len(prompt)] = torch.tensor(prompt, device=device)
        left[b, width - len(prompt):] = ids[b, : len(prompt)]
        left_mask[b, width - len(prompt):] = True
    positions = (left_mask.long().cumsum(1) - 1).clamp_min(0)
    hidden, cache = model.trunk(model.embed(left), left_mask, positions, torch.zeros_like(left_mask),
                                use_cache=True)
    if hidden_out is not None:
        for b, prompt in enumerate(prompts):
            hidden_out[b, : len(prompt)] = hidden[b, width - len(prompt):]
    h = hidden[:, -1]  # (A, H) state of each active row's last position
    attention = torch.zeros(rows, width + capacity, dtype=torch.bool, device=device)  # grows by one column a step
    attention[:, :width] = left_mask
    columns = width
    active = torch.arange(rows, device=device)  # rows still generating, in cache order
    position = prompt_lengths - 1  # (A,) index of each active row's last position
    in_block = torch.zeros(rows, dtype=torch.bool, device=device)
    block_len = torch.zeros(rows, dtype=torch.long, device=device)
    blocks = torch.zeros(rows, dtype=torch.long, device=device)
    total = torch.zeros(rows, dtype=torch.long, device=device)
    tokens = torch.zeros(rows, dtype=torch.long, device=device)
    lengths = prompt_lengths.clone()
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    forward_passes = 1
    sample_decisions = settings.decisions == "sample"
    stops = [torch.tensor(s, device=device) for s in settings.stop_sequences if s]

    while active.numel() > 0:
        # 1. Decisions on the state of each active row's last position.
        in_latent = in_block[active]
        go_latent = torch.zeros_like(in_latent)
        if mode.has_slots:
            can_open = ~in_latent & (blocks[active] < settings.max_blocks) & (total[active] < settings.max_total_latents)
            opened, lp = _decide(model.start_logits(h), settings.start_threshold, sample_decisions)
            start_lp[active, position] = torch.where(can_open, lp, 0.0).to(precise)
            start_dec[active, position] = can_open
            go_latent |= can_open & opened
            cap = model.settings.k if mode.fixed_block_length else settings.max_latents_per_block
            must_stop = in_latent & ((block_len[active] >= cap) | (total[active] >= settings.max_total_latents))
            free_stop = in_latent & ~must_stop & mode.has_stop_decisions
            stopped, lp = _decide(model.stop_logits(h), settings.stop_threshold, sample_decisions)
            stop_lp[active, position] = torch.where(free_stop, lp, 0.0).to(precise)
            stop_dec[active, position] = free_stop
            keeps_going = ~stopped if mode.has_stop_decisions else torch.ones_like(stopped)
            go_latent |= in_latent & ~must_stop & keeps_going

        # 2. Tokens for rows that continue in language.
        logits = model.token_logits(h)  # (A, V)
        token = sample_tokens(scaled_logits(logits, settings.logprob_temperature), settings.temperature, settings.top_p)
        logprob = token_logprobs(logits, token, settings.logprob_temperature)
        next_position = position + 1
        speaks = ~go_latent
        ids[active[speaks], next_position[speaks]] = token[speaks]
        token_lp[active[speaks], next_position[speaks]] = logprob[speaks]
        latent[active[go_latent], next_position[go_latent]] = True
        lengths[active] = next_position + 1
        tokens[active] += speaks.long()
        total[active] += go_latent.long()
        blocks[active] += (go_latent & ~in_latent).long()
        block_len[active] = torch.where(go_latent, block_len[active] + 1, 0)
        in_block[active] = go_latent

        # 3. Rows that emitted EOS or a stop sequence, or ran out of tokens, are done: drop them from the cache.
        done = (token == eos_id) | stop_reached(ids, active, next_position, prompt_lengths, stops)
        ended = speaks & (done | (tokens[active] >= settings.max_new_tokens))
        finished[active[ended & done]] = True
        if ended.all():
            break
        if ended.any():
            keep = (~ended).nonzero().flatten()
            cache.batch_select_indices(keep)
            active, attention, next_position, go_latent = active[keep], attention[keep], next_position[keep], go_latent[keep]
            token, h = token[keep], h[keep]

        # 4. One new position per active row: a token embedding or a latent input.
        if mode.slot_input == "pause":
            latent_input = model.pause_inputs((block_len[active] - 1).clamp_min(0))
        else:
            latent_input = model.latent_inputs(h)
            if settings.latent_noise_std > 0:
                mean = latent_input
                latent_input = mean + settings.latent_noise_std * torch.randn_like(mean)
                density = gaussian_logprob(latent_input, mean, settings.latent_noise_std).to(precise)
                latent_lp[active[go_latent], next_position[go_latent]] = density[go_latent]
        embeds = torch.where(go_latent[:, None], latent_input, model.embed(token))[:, None, :]  # (A, 1, H)
        slot_inputs[active[go_latent], next_position[go_latent]] = embeds[go_latent, 0]
        attention[:, columns] = True
        columns += 1
        hidden, cache = model.trunk(embeds, attention[:, :columns], next_position[:, None], go_latent[:, None], cache,
                                    use_cache=True)
        forward_passes += 1
        h = hidden[:, 0]
        position = next_position
        if hidden_out is not None:
            hidden_out[active, position] = h

    used = int(lengths.max())
    attention_mask = torch.arange(used, device=device)[None, :] < lengths[:, None]
    batch = LatentBatch(ids[:, :used], latent[:, :used], attention_mask, prompt_lengths)
    return Trajectories(
        batch=batch, token_logprobs=token_lp[:, :used], start_logprobs=start_lp[:, :used],
        start_decided=start_dec[:, :used], stop_logprobs=stop_lp[:, :used], stop_decided=stop_dec[:, :used],
        latent_logprobs=latent_lp[:, :used],
        slot_inputs=slot_inputs[:, :used], finished=finished,
        hidden=None if hidden_out is None else hidden_out[:, :used], forward_passes=forward_passes,
    )
