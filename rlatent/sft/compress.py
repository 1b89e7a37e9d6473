"""Compressed-chain training for phase 1 (`sft.compress`), after CoLaR and Soft Thinking.

Backpropagating through the latent recurrence (Coconut) or matching a
teacher's states at a block's slots (`rlatent.sft.distill`) tells a block
what to end with, not what to pass from one slot to the next: on two
operations in one block, the slots of this repository's runs hold neither
partial result. CoLaR (Tan et al. 2025, "Think Silently, Think Fast: Dynamic
Latent Compression of LLM Reasoning Chains", arXiv 2505.16552) trains the
other way round. The written chain a block stands for (" 10 * 7 = 70, 70 - 18
=", one step per operation with `split_steps`) is cut into as many contiguous
pieces as the block has slots, and each slot's input is the *compressed
embedding* of its piece, the mean of its tokens' embeddings. With those
inputs known, phase 1 is one parallel pass (teacher forcing).

What a slot is fed at evaluation must then be something the model can write
itself. CoLaR regresses it with a latent head; here (a first version
regressed it with an L1 distance through `mlp`, and its slots settled on
one problem-independent sequence, 4.3 % on the two-operation task) the state
before each slot predicts its piece's tokens through the LM head, a
cross-entropy against the piece's tokens, each weighted equally, and
`latent.proj: soft` feeds back the probability-weighted mixture of the top
token embeddings (Soft Thinking). A model that puts equal probability on a
piece's tokens feeds back exactly their mean: the teacher-forced input. The
slot after the one that holds "70" then reads a 70 the model wrote itself,
which a pause block, fed constants, cannot.

Teacher forcing trains every slot in one pass but never shows the model its
own mixtures, which at evaluation drift from the means it was fed (exposure
bias); with `teacher_forcing: false` phase 1 runs the exact recurrent forward
instead, each slot fed the mixture the model itself predicted, and the same
loss asks each state for its slot's piece.

The loss is summed over slots and divided by the slots of the whole optimizer
step.

A piece's mean embedding, and a mixture of token embeddings, hold which tokens a
slot stands for, not their order. SIM-CoT (Wei et al. 2025, arXiv 2509.20317)
supervises each latent through an auxiliary decoder that writes the latent's
step out in order; `decoder_loss` does this with the model itself as the decoder
(`sft.compress.decoder_weight`), on the slot's fed-back input alone. On state
latents at two tokens a slot it gave 7.0 % on the two-operation task (seed 10),
no better than the mixtures (experiments/2026-12-07-compression-levers.md).

Measured (docs/results.md, two operations in one step, SmolLM2-135M): at
about one token of the stepwise chain a slot (k = 16) the block answers 25.0
and 31.0 % right (two seeds) against 5.0 % for the pause control; at
about two tokens a slot (k = 8) it is at chance, teacher-forced or not: a
piece's mean embedding loses the order of its tokens ("70" and "07").
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rlatent.data.examples import SFTExample, block_chains, block_spans
from rlatent.data.gsm8k import Problem
from rlatent.errors import DataError
from rlatent.latent.batch import LatentBatch
from rlatent.latent.forward import ForwardOutput
from rlatent.latent.policy import precise_dtype
from rlatent.model.latent_model import LatentModel


INPUT_ONLY = -2
"""A piece's token id t stored as `INPUT_ONLY - t`: fed to its slot under teacher forcing, not a loss target."""


def chain_pieces(tokens: list[int], slots: int) -> list[tuple[int, ...]]:
    """`tokens` cut into `slots` contiguous pieces of near-equal length, in order (piece j starts at
    len * j // slots). With fewer tokens than slots, slot j < len stands for token j and each later slot
    is a filler: fed the last token again (the chain is complete) but no loss target, so that every
    token of the chain counts once in the chain loss."""
    count = len(tokens)
    if not count:
        raise ValueError("a block stands for no written tokens")
    if count < slots:
        return [(token,) for token in tokens] + [(INPUT_ONLY - tokens[-1],)] * (slots - count)
    return [tuple(tokens[count * j // slots : count * (j + 1) // slots]) for j in range(slots)]


def compress_example(problem: Problem, student: SFTExample, tokenizer, latent_marks: int | None,
                     split_up_to: int) -> SFTExample:
    """`student` with its `slot_chains`: each block of the first `latent_marks` marks (all when None) stands
    for its mark's written chain (`block_chains`, stepwise for marks of 2 to `split_up_to` operations), cut
    into one piece per slot. A `DataError` naming the problem when blocks and marks do not pair up (two
    marks back to back share one block)."""
    chains = block_chains(problem.answer, split_up_to, latent_marks)
    spans = block_spans(student.latent_mask)
    if len(spans) != len(chains):
        raise DataError(f"{problem.source}: {len(spans)} latent blocks for {len(chains)} converted marks; "
                        "sft.compress needs one block per mark (latent.placement replace, no marks back to back)")
    pieces = [piece for (start, end), chain in zip(spans, chains)
              for piece in chain_pieces(tokenizer.encode(chain, add_special_tokens=False), end - start)]
    return replace(student, slot_chains=tuple(pieces))


def chain_inputs(model: LatentModel, batch: LatentBatch) -> torch.Tensor:
    """(B, T, H) each latent slot's compressed embedding (the mean of its piece's token embeddings), 0
    elsewhere; no gradient (a teacher-forced input)."""
    pieces = batch.chain_ids[batch.latent_mask]  # (N, C): only the slots' pieces are embedded
    valid = pieces != -1
    tokens = torch.where(pieces <= INPUT_ONLY, INPUT_ONLY - pieces, pieces).clamp_min(0)
    inputs = torch.zeros(*batch.latent_mask.shape, model.hidden_size, device=model.device, dtype=model.dtype)
    with torch.no_grad():
        summed = (model.embed(tokens) * valid[..., None]).sum(1)
        inputs[batch.latent_mask] = summed / valid.sum(1, keepdim=True)
    return inputs


def compress_loss(model: LatentModel, batch: LatentBatch, out: ForwardOutput) -> torch.Tensor:
    """Sum over latent slots of the cross-entropy of the slot's piece of the chain (each of its tokens
    weighted 1 / its length) under the LM head at the state before the slot, what `soft` mixes the slot's
    input from at evaluation; `out` is the forward of `batch`, teacher-forced (`chain_inputs`) or free-running.
    Filler slots (`chain_pieces`) add nothing. In the pause control with the chain loss (`latent.mode: pause`)
    the slots are fed pause inputs and the same states carry the same loss: only what is fed back differs."""
    rows, positions = batch.latent_mask.nonzero(as_tuple=True)
    if not len(rows):
        return out.hidden.sum() * 0.0
    log_probs = torch.log_softmax(model.token_logits(out.hidden[rows, positions - 1]).float(), dim=-1)
    pieces = batch.chain_ids[rows, positions]  # (N, C), -1 after each piece, fillers <= INPUT_ONLY
    valid = pieces >= 0
    picked = log_probs.gather(1, pieces.clamp_min(0)) * valid
    return -(picked.sum(1) / valid.sum(1).clamp_min(1)).sum()


def decoder_loss(model: LatentModel, batch: LatentBatch, out: ForwardOutput) -> torch.Tensor:
    """SIM-CoT's step-level loss: summed over latent slots, the mean cross-entropy of the slot's piece of the
    chain written by the model from the slot's latent input alone (a sequence of its own: the latent at
    position 0, then the piece's tokens teacher-forced, no question before it). The latent is recomputed with
    gradient from `out`'s state before the slot, what the recurrent forward fed there, so the loss trains the
    states the latents are made of as well as the weights that decode them. Filler slots (`chain_pieces`) add
    nothing. One batched forward over slots x (longest piece) positions."""
    rows, positions = batch.latent_mask.nonzero(as_tuple=True)
    if not len(rows):  # a curriculum stage that converts no mark yet
        return out.hidden.sum() * 0.0
    pieces = batch.chain_ids[rows, positions]  # (N, C): -1 after each piece, fillers <= INPUT_ONLY
    targets = pieces >= 0  # a prefix of each row: position j writes token j
    written = targets[:, 0]
    if not bool(written.any()):
        return out.hidden.sum() * 0.0
    rows, positions, pieces, targets = rows[written], positions[written], pieces[written], targets[written]
    tokens = pieces.clamp_min(0)
    latent = model.latent_inputs(out.hidden[rows, positions - 1])  # (N, H)
    inputs = torch.cat([latent[:, None], model.embed(tokens[:, :-1]).to(latent.dtype)], 1)  # (N, C, H)
    width = inputs.shape[1]
    position_ids = torch.arange(width, device=inputs.device).expand(len(rows), width)
    hidden, _ = model.trunk(inputs, targets.long(), position_ids, position_ids == 0)
    logits = model.token_logits(hidden[targets])
    log_probs = torch.log_softmax(logits.to(precise_dtype(logits.dtype)), dim=-1)
    picked = log_probs.gather(1, tokens[targets][:, None])[:, 0]
    slot_of = torch.arange(len(rows), device=inputs.device)[:, None].expand_as(targets)[targets]
    per_slot = picked.new_zeros(len(rows)).index_add(0, slot_of, picked)
    return -(per_slot / targets.sum(1)).sum()
