"""The training forward over sequences with latent slots.

A latent slot's input is `proj(h)` of the position before it, so a sequence
with latents cannot be computed in one parallel pass. `recurrent_forward` does
what Coconut does, batched over rows whose blocks sit at different places and
have different lengths: one pass per *latent wave*. In pass w every row
computes its w-th chunk, the positions from its (w-1)-th latent slot up to just
before its w-th; the chunk's only latent (if any) is its first position, whose
input comes from the last hidden state of the row's previous chunk. Explicit
position ids keep every position at its true index. Gradients flow through the
keys and values and the fed-back states, so the recurrence is trained exactly.

Each pass's chunks are *packed*: all rows' new positions one after the other in
one batch-1 sequence, so the linear layers compute real positions only, and
rlatent's `PassCache` (`model/kv_cache.py`) attends row by row, keeping every
pass's keys and values once (no cache copy per pass, no repeated K/V, attention
recomputed in the backward). Models whose attention that cache cannot take
(`LatentModel.kv_unsupported`) run the padded form instead: chunks right-padded
to the widest, the padding holes hidden by the attention mask, against a
Hugging Face cache.

`parallel_forward` is the one-pass alternative when the latent inputs are
already known: stored latents (`detached`), pause embeddings, or no latents.

Each form can also return every layer's state at a few chosen positions
(`anchors`), what self-distillation (`rlatent.sft.distill`) compares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlatent.latent.batch import LatentBatch
from rlatent.model.kv_cache import PassCache, RowLayout
from rlatent.model.latent_model import LatentModel


@dataclass
class ForwardOutput:
    hidden: torch.Tensor  # (B, T, H) last-layer state at every position (0 at padding)
    slot_inputs: torch.Tensor  # (B, T, H) input embedding used at each latent slot (0 elsewhere), no grad
    num_passes: int
    layers: torch.Tensor | None = None  # (L, N, H) every layer's state at the `anchors` asked for (row-major)


def default_pass_cost(device: torch.device) -> float:
    """What one extra pass costs, in positions per row: small on a CPU (compute-bound), large on a
    GPU, where a pass over a small batch costs about as much as thousands of positions."""
    return 16.0 if device.type == "cpu" else 2048.0


def forward(model: LatentModel, batch: LatentBatch, gradient: str = "recurrent",
            slot_inputs: torch.Tensor | None = None, pass_cost: float | None = None,
            anchors: torch.Tensor | None = None) -> ForwardOutput:
    """Forward a batch the way its latent mode requires.

    `gradient="detached"` computes the latents without gradient (or takes the stored
    `slot_inputs`) and then runs one parallel pass with gradient through the rest.
    `pass_cost` tunes the wave plan (`plan_waves`); None = `default_pass_cost`.
    `anchors` (B, T) bool: also return every layer's state there (`ForwardOutput.layers`).
    """
    mode = model.latent_mode
    if not mode.has_slots or not batch.latent_mask.any():
        return parallel_forward(model, batch, torch.zeros(*batch.input_ids.shape, model.hidden_size,
                                                          device=model.device, dtype=model.dtype), anchors)
    if not mode.recurrent:  # constant slot inputs (pause): one pass
        inputs = model.pause_inputs(batch.block_index())
        return parallel_forward(model, batch, inputs * batch.latent_mask[..., None], anchors)
    if slot_inputs is None and gradient == "detached":
        with torch.no_grad():
            latents = recurrent_forward(model, batch, pass_cost)
        out = parallel_forward(model, batch, latents.slot_inputs, anchors)
        out.num_passes += latents.num_passes
        return out
    if slot_inputs is not None:
        return parallel_forward(model, batch, slot_inputs, anchors)
    return recurrent_forward(model, batch, pass_cost, anchors)


def parallel_forward(model: LatentModel, batch: LatentBatch, slot_inputs: torch.Tensor,
                     anchors: torch.Tensor | None = None) -> ForwardOutput:
    """One pass with known inputs at the latent slots; `slot_inputs` is (B, T, H). Packed, with shared
    prompts computed once (`packed_forward`), where the model runs on rlatent's KV states."""
    if model.kv_unsupported is None:
        rows = batch.input_ids.shape[0]
        return packed_forward(model, batch, torch.zeros(1, rows, dtype=torch.long), batch.lengths.cpu()[None],
                              slot_inputs, anchors)
    embeds = torch.where(batch.latent_mask[..., None], slot_inputs.to(model.dtype), model.embed(batch.input_ids))
    states, _ = model.trunk(embeds, batch.attention_mask, batch.positions(), batch.latent_mask,
                            all_layers=anchors is not None)
    layers = None if anchors is None else torch.stack([layer[anchors] for layer in states])
    hidden = (states if anchors is None else states[-1]) * batch.attention_mask[..., None]
    return ForwardOutput(hidden, slot_inputs.detach(), num_passes=1, layers=layers)


def plan_waves(latent_mask: torch.Tensor, lengths: torch.Tensor, pass_cost: float | None = None,
               packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk boundaries per pass: `starts`, `ends`, each (P, B).

    Every latent slot must start a chunk (its input needs the state before it).
    Beyond that, long language stretches may be split: chunking each row up to
    its next latent gives the fewest passes, but rows whose blocks sit at
    different places then pad each other heavily (1.5-2x the positions with three
    blocks per row). Capping chunks at a width trades padding for passes. The
    plan minimises `rows * total width + pass_cost * passes` over a ladder of
    caps; `pass_cost` is what one extra model call costs, in positions per row.
    A row with fewer chunks gets empty ones (start = end = length). None = the
    default for the mask's device (`default_pass_cost`). `packed`: the passes
    carry no padding (the packed forward), so the width term is the real
    positions, the same for every plan, and the fewest passes win unless a
    pass costs nothing.
    """
    pass_cost = default_pass_cost(latent_mask.device) if pass_cost is None else pass_cost
    rows = latent_mask.shape[0]
    cuts = [[0] + latent_mask[b, : int(lengths[b])].nonzero().flatten().tolist() + [int(lengths[b])]
            for b in range(rows)]
    longest = int(lengths.max())
    best = None
    for cap in sorted({longest} | {c for c in (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256) if c < longest}):
        plan = [_capped_chunks(c, cap) for c in cuts]
        passes = max(len(p) for p in plan)
        if packed:
            width = int(lengths.sum())
        else:
            width = rows * sum(max(p[w][1] - p[w][0] if w < len(p) else 0 for p in plan) for w in range(passes))
        cost = width + pass_cost * passes
        if best is None or cost < best[0]:
            best = (cost, plan, passes)
    _, plan, passes = best
    starts = torch.empty(passes, rows, dtype=torch.long)
    ends = torch.empty(passes, rows, dtype=torch.long)
    for b, chunks in enumerate(plan):
        done = cuts[b][-1]
        chunks = chunks + [(done, done)] * (passes - len(chunks))
        starts[:, b] = torch.tensor([c[0] for c in chunks])
        ends[:, b] = torch.tensor([c[1] for c in chunks])
    return starts, ends


def _capped_chunks(cuts: list[int], cap: int) -> list[tuple[int, int]]:
    """Chunks between consecutive cuts, each at most `cap` long."""
    return [(start, min(start + cap, end)) for a, end in zip(cuts[:-1], cuts[1:]) for start in range(a, end, cap)]


def recurrent_forward(model: LatentModel, batch: LatentBatch, pass_cost: float | None = None,
                      anchors: torch.Tensor | None = None) -> ForwardOutput:
    """Exact forward with gradient through the latent recurrence (one pass per latent wave)."""
    if model.kv_unsupported:
        return padded_recurrent_forward(model, batch, pass_cost, anchors)
    pass_cost = default_pass_cost(batch.input_ids.device) if pass_cost is None else pass_cost
    starts, ends = plan_waves(batch.latent_mask.cpu(), batch.lengths.cpu(), pass_cost, packed=True)
    return packed_forward(model, batch, starts, ends, None, anchors)


def packed_forward(model: LatentModel, batch: LatentBatch, starts: torch.Tensor, ends: torch.Tensor,
                   known_inputs: torch.Tensor | None, anchors: torch.Tensor | None = None) -> ForwardOutput:
    """The passes of a plan (`starts`, `ends`: (P, B) CPU chunk bounds), each packed against a `PassCache`.
    A latent slot's input is `known_inputs` (B, T, H) there, or, when None, the latent of the row's state at
    the end of its previous chunk (then a slot must open its chunk). Rows that share a prompt
    (`shared_prompt_sources`) compute it once."""
    rows, length = batch.input_ids.shape
    device = batch.input_ids.device
    latent_mask = batch.latent_mask.cpu()
    sources = shared_prompt_sources(batch)
    # A row whose prompt another row computes starts after it: its chunks inside the prompt become empty
    # (start = end, at the same place, so the row still sees the prompt's keys computed so far).
    floor = torch.where(sources != torch.arange(rows), batch.prompt_lengths.cpu(), 0)
    starts = torch.maximum(starts, torch.minimum(floor, ends))
    sizes = ends - starts
    totals = sizes.sum(1)  # (P,) packed positions per pass
    bases = totals.cumsum(0) - totals
    # Every position's index in the concatenation of all passes' packed positions.
    location = torch.zeros(rows, length, dtype=torch.long)
    for start, size, base in zip(starts, sizes, bases):
        offsets = base + size.cumsum(0) - size
        column = torch.arange(int(size.max()))
        valid = column[None, :] < size[:, None]
        row_of, col_of = valid.nonzero(as_tuple=True)
        location[row_of, start[row_of] + col_of] = offsets[row_of] + col_of
    in_prompt = torch.arange(length)[None, :] < floor[:, None]
    location = torch.where(in_prompt, location[sources], location)  # the shared prompt's keys and states
    location_device = location.to(device)
    slot_inputs = (torch.zeros(rows, length, model.hidden_size, device=device, dtype=model.dtype)
                   if known_inputs is None else known_inputs.detach())
    cache = PassCache()
    pieces, last_hidden = [], torch.zeros(rows, model.hidden_size, device=device, dtype=model.dtype)
    wanted = None if anchors is None else location[anchors.cpu()]  # packed index of each anchor
    picked, picked_order = [], []
    row_index = torch.arange(rows)
    for start, end, size, base in zip(starts, ends, sizes, bases):
        total = int(size.sum())
        layout = RowLayout.build(start, end, location, device)
        packed_rows = row_index.repeat_interleave(size)  # (N,) row of each packed position
        packed_positions = start.repeat_interleave(size) + torch.arange(total) - (size.cumsum(0) - size).repeat_interleave(size)
        rows_d, positions_d = packed_rows.to(device), packed_positions.to(device)
        embeds = model.embed(batch.input_ids[rows_d, positions_d])  # (N, H)
        slots = latent_mask[packed_rows, packed_positions]  # (N,)
        slots_d = slots.to(device)
        if slots.any():
            at = slots.nonzero().flatten()  # packed indices of this pass's latent slots
            slot_rows, slot_positions = packed_rows[at].to(device), packed_positions[at].to(device)
            if known_inputs is None:  # a recurrence: a slot opens its chunk, fed the row's last state
                latent = model.latent_inputs(last_hidden[slot_rows])  # (n, H)
                slot_inputs[slot_rows, slot_positions] = latent.detach()
            else:
                latent = known_inputs[slot_rows, slot_positions].to(model.dtype)
            embeds = embeds.index_copy(0, at.to(device), latent)
        cache.next_pass(layout)
        states, _ = model.trunk(embeds[None], None, positions_d[None], slots_d[None], cache=cache,
                                all_layers=anchors is not None)
        if anchors is not None:  # this pass's anchors, every layer
            inside = ((wanted >= base) & (wanted < base + total)).nonzero().flatten()
            at = (wanted[inside] - base).to(device)
            picked.append(torch.stack([layer[0, at] for layer in states]))
            picked_order.append(inside)
            states = states[-1]
        hidden = states[0]  # (N, H)
        pieces.append(hidden)
        # Each row's state at the end of its chunk, when this pass computed it (for a row sharing a prompt,
        # the pass that computed the prompt's end, in the row it shares).
        last = location[row_index, (end - 1).clamp_min(0)] - base
        has = (end > 0) & (last >= 0) & (last < total)
        last_hidden = torch.where(has.to(device)[:, None], hidden[last.clamp(0, total - 1).to(device)], last_hidden)
    every = torch.cat(pieces)  # (sum of passes' positions, H)
    hidden = every[location_device] * batch.attention_mask[..., None]
    layers = None
    if anchors is not None:  # back in row-major anchor order
        layers = torch.cat(picked, 1)[:, torch.cat(picked_order).argsort().to(device)]
    return ForwardOutput(hidden, slot_inputs, num_passes=len(pieces), layers=layers)


def shared_prompt_sources(batch: LatentBatch) -> torch.Tensor:
    """(B,) for each row, the first row with the same prompt (itself if none before it). GRPO's G rollouts
    of a prompt share it: the recurrent forward computes it once, in that first row, and the others attend
    to its keys and take its states, so the gradient through the prompt is summed over the group (exact)."""
    ids, lengths = batch.input_ids.cpu(), batch.prompt_lengths.cpu().tolist()
    first: dict[tuple[int, ...], int] = {}
    return torch.tensor([first.setdefault(tuple(ids[b, :n].tolist()), b) for b, n in enumerate(lengths)],
                        dtype=torch.long)


def padded_recurrent_forward(model: LatentModel, batch: LatentBatch, pass_cost: float | None = None,
                             anchors: torch.Tensor | None = None) -> ForwardOutput:
    """`recurrent_forward` for models rlatent's `PassCache` does not cover: each pass right-padded to its widest
    chunk, against a Hugging Face cache that grows by concatenation."""
    rows, length = batch.input_ids.shape
    device = batch.input_ids.device
    pass_cost = default_pass_cost(device) if pass_cost is None else pass_cost
    plan = plan_waves(batch.latent_mask.cpu(), batch.lengths.cpu(), pass_cost)  # cost already resolved for `device`
    starts, ends = (t.to(device) for t in plan)
    row_index = torch.arange(rows, device=device)
    slot_inputs = torch.zeros(rows, length, model.hidden_size, device=device, dtype=model.dtype)
    location = torch.zeros(rows, length, dtype=torch.long, device=device)  # column of each position in `pieces`
    pieces, masks, cache, last_hidden, offset = [], [], None, None, 0
    layer_pieces = []  # with `anchors`: every layer's states of each pass
    for start, end in zip(starts, ends):
        sizes = end - start  # (B,)
        width = int(sizes.max())
        column = torch.arange(width, device=device)
        valid = column[None, :] < sizes[:, None]  # (B, C)
        positions = (start[:, None] + column[None, :]).clamp(max=length - 1)  # (B, C)
        embeds = model.embed(batch.input_ids.gather(1, positions))  # (B, C, H)
        slots = batch.latent_mask.gather(1, positions) & valid  # (B, C), only ever column 0
        if slots.any():
            latent = model.latent_inputs(last_hidden)  # (B, H)
            embeds = torch.where(slots[..., None], latent[:, None, :], embeds)
            slot_rows = slots[:, 0]
            slot_inputs[row_index[slot_rows], start[slot_rows]] = latent[slot_rows].detach()
        masks.append(valid)
        states, cache = model.trunk(embeds, torch.cat(masks, 1), positions, slots, cache, use_cache=True,
                                    all_layers=anchors is not None)
        if anchors is not None:
            layer_pieces.append(states)
            states = states[-1]
        hidden = states
        pieces.append(hidden)
        last = hidden[row_index, (sizes - 1).clamp_min(0)]
        last_hidden = last if last_hidden is None else torch.where((sizes > 0)[:, None], last, last_hidden)
        valid_rows, valid_columns = valid.nonzero(as_tuple=True)
        location[valid_rows, positions[valid_rows, valid_columns]] = offset + valid_columns
        offset += width
    every = torch.cat(pieces, 1)  # (B, sum of widths, H)
    hidden = every.gather(1, location[..., None].expand(-1, -1, every.shape[-1]))
    hidden = hidden * batch.attention_mask[..., None]
    layers = None
    if anchors is not None:
        anchor_rows, anchor_positions = anchors.nonzero(as_tuple=True)
        columns = location[anchor_rows, anchor_positions]
        layers = torch.stack([torch.cat(pieces, 1)[anchor_rows, columns] for pieces in zip(*layer_pieces)])
    return ForwardOutput(hidden, slot_inputs, num_passes=len(pieces), layers=layers)
