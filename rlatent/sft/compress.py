"""Compressed-chain training for phase 1 (`sft.compress`), after CoLaR.

Backpropagating through the latent recurrence (Coconut) or matching a
teacher's states at a block's slots (`rlatent.sft.distill`) tells a block
what to end with, not what to pass from one slot to the next: on two
operations in one block, the slots of this repository's runs hold neither
partial result. CoLaR (Tan et al. 2025, "Think Silently, Think Fast: Dynamic
Latent Compression of LLM Reasoning Chains", arXiv 2505.16552) trains the
other way round. The written chain a block stands for (" 10 * 7 = 70, 70 - 18
=", one step per operation with `split_steps`) is cut into as many contiguous
pieces as the block has slots, and each slot's input is the *compressed
embedding* of its piece: the mean of the piece's token embeddings, here
rescaled to the mean token-embedding norm (the scale the trunk reads inputs
at, and the one `norm_match`-based projections produce). With those inputs
known, phase 1 is one parallel pass (teacher forcing), and a regression term
teaches the projection of the state before each slot (`latent.proj`, what the
sampler feeds back) to produce that slot's compressed embedding: the slot
after the one holding "70" then reads a 70 that the model wrote itself.
At evaluation and in phase 2 the fed-back states replace the compressed
embeddings, as CoLaR's latent head does at inference.

The regression is the spread-scaled L1 distance of `rlatent.sft.distill`
(one home for the formula), summed over slots and divided by the slots of the
whole optimizer step.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rlatent.data.examples import SFTExample, block_chains, block_spans
from rlatent.data.gsm8k import Problem
from rlatent.errors import DataError
from rlatent.latent.batch import LatentBatch
from rlatent.latent.forward import ForwardOutput
from rlatent.model.latent_model import LatentModel
from rlatent.sft.distill import distill_loss


def chain_pieces(tokens: list[int], slots: int) -> list[tuple[int, ...]]:
    """`tokens` cut into `slots` contiguous pieces of near-equal length, in order (piece j starts at
    len * j // slots); when there are fewer tokens than slots, a slot whose piece would be empty takes the
    token its piece starts at, so every slot stands for something."""
    count = len(tokens)
    if not count:
        raise ValueError("a block stands for no written tokens")
    pieces = []
    for j in range(slots):
        start = min(count * j // slots, count - 1)
        pieces.append(tuple(tokens[start : max(count * (j + 1) // slots, start + 1)]))
    return pieces


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
    """(B, T, H) each latent slot's compressed embedding (mean of its piece's token embeddings at the mean
    token-embedding norm), 0 elsewhere; no gradient (a target and a teacher-forced input)."""
    ids = batch.chain_ids
    valid = ids >= 0
    with torch.no_grad():
        summed = (model.embed(ids.clamp_min(0)).float() * valid[..., None]).sum(2)
        mean = summed / valid.sum(2, keepdim=True).clamp_min(1)
        scaled = mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-6) * model.embedding_norm
    return (scaled * batch.latent_mask[..., None]).to(model.dtype)


def compress_loss(model: LatentModel, batch: LatentBatch, out: ForwardOutput, inputs: torch.Tensor) -> torch.Tensor:
    """Sum over latent slots of the distance between what the model would feed each slot (the projection of
    the state before it) and the slot's compressed embedding `inputs` (`chain_inputs`); `out` is the
    teacher-forced forward of `batch` with those inputs."""
    rows, positions = batch.latent_mask.nonzero(as_tuple=True)
    predicted = model.latent_inputs(out.hidden[rows, positions - 1])
    return distill_loss(predicted[None], inputs[rows, positions][None])
