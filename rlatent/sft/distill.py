"""CODI-style self-distillation for phase 1 (`sft.distill`): the written chain teaches the latents.

The next-token loss gives a block one token's worth of signal: the result written
after it. CODI (Shen et al. 2025, "CODI: Compressing Chain-of-Thought into
Continuous Space via Self-Distillation", arXiv 2502.21074) gives it a dense one.
The same model reads the written chain (the *teacher*); where the teacher is
about to write a step's result (the `=` of `17-5 = 12`), its hidden states in
every layer hold that step's computation. The *student* reads the same answer
with the step replaced by a latent block, and at the block's last slot, which
predicts the same result token, every layer's state is pulled towards the
teacher's. (CODI aligns one position, the one before the final answer, behind
one block of latents; here each converted mark is a block of its own, so each
block's closing slot is aligned.) The teacher's states are targets (no gradient through them); the
teacher itself keeps training on its own next-token loss, as in CODI, so it stays
a reader of written chains after a curriculum has converted every mark.

The distance, per aligned position and layer, is the mean absolute difference
divided by the teacher state's standard deviation (CODI's L1 scaled by the
teacher's spread, per vector here, so the term is a sum over positions that adds
up across gradient-accumulation micro-batches). Layers are averaged.

Stepwise teachers (`sft.distill.split_steps`): a mark of several operations
(`12*7+5`) gives its block one state to match, the one predicting 89, and no
guide to the partial result a serial computation would pass on. Split, the
teacher writes `12 * 7 = 84, 84 + 5 = 89`, and the block's slots, evenly
spaced, line up with each partial result in turn (slots 2 and 4 of a
four-slot block; the closing slot always with the last), so a fed-back state
is pulled towards one that holds 84 before the next slot computes 84 + 5.

Alignment: the teacher's example is `build_example` with a one-slot block at
each of the student's converted marks (each mark of the split answer, when
stepwise), `insert` placement, then the slots removed. Its text pieces are tokenised exactly as the student's, so the text
after a block (" 12 stickers now.") is the same tokens in both, and the
teacher's *anchor*, the token just before a removed slot, predicts the token
the student's block-closing slot predicts.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rlatent.data.examples import SFTExample, block_spans, build_example, split_marks
from rlatent.data.gsm8k import Problem
from rlatent.errors import DataError
from rlatent.latent.batch import LatentBatch
from rlatent.latent.forward import ForwardOutput, forward
from rlatent.model.latent_model import LatentModel
from rlatent.sft.losses import token_losses


def teacher_example(problem: Problem, tokenizer, latent_marks: int | None) -> SFTExample:
    """The written chain of `problem`, its `anchors` the positions predicting each converted mark's result
    (the first `latent_marks` marks, all when None: the student's blocks)."""
    marked = build_example(problem, tokenizer, 1, "insert", latent_marks)
    keep = [i for i, slot in enumerate(marked.latent_mask) if not slot]
    anchors = tuple(i - 1 - sum(marked.latent_mask[:i]) for i, slot in enumerate(marked.latent_mask)
                    if slot and not marked.latent_mask[i - 1])
    return replace(marked, input_ids=[marked.input_ids[i] for i in keep], latent_mask=[False] * len(keep),
                   next_step_mask=[marked.next_step_mask[i] for i in keep], anchors=anchors)


def distill_pair(problem: Problem, student: SFTExample, tokenizer, latent_marks: int | None,
                 split_up_to: int) -> tuple[SFTExample, SFTExample]:
    """(`student` with its `anchors`, its teacher): the teacher writes each of the first `latent_marks` marks
    of 2 to `split_up_to` operations one step per operation (none when 1; `rlatent.data.examples.split_marks`),
    and the student's block for such a mark is anchored at that many evenly spaced slots, the closing slot
    last; every other block at its closing slot. A `DataError` naming the problem when they do not pair up."""
    answer, splits = split_marks(problem.answer, split_up_to, latent_marks)
    teacher = teacher_example(replace(problem, answer=answer), tokenizer,
                              None if latent_marks is None else sum(splits))
    spans = block_spans(student.latent_mask)
    if len(spans) != len(splits) or sum(splits) != len(teacher.anchors):
        raise DataError(f"{problem.source}: {len(spans)} latent blocks for {len(splits)} converted marks and "
                        f"{len(teacher.anchors)} teacher anchors; sft.distill needs latent.placement insert or "
                        "replace")
    anchors = tuple(start + ((end - start) * (j + 1)) // count - 1
                    for (start, end), count in zip(spans, splits) for j in range(count))
    return replace(student, anchors=anchors), teacher


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Sum over aligned positions of the layer-averaged, spread-scaled L1 distance; `student` and `teacher`
    are (L, N, H) states of the same N positions, the teacher's taken as fixed targets."""
    if not student.shape[1]:  # no block in these rows (a curriculum's written stage)
        return student.sum() * 0.0
    target = teacher.detach().float()
    distance = (student.float() - target).abs().mean(-1) / target.std(-1).clamp_min(1e-6)  # (L, N)
    return distance.mean(0).sum()


def distill_counts(students: list[LatentBatch], teachers: list[LatentBatch]) -> tuple[int, int]:
    """(aligned positions, teacher target tokens) over every micro-batch of an optimizer step: what the two
    terms are means over, so micro-batch shares add up to the whole batch's."""
    positions = sum(int(batch.anchor_mask.sum()) for batch in students)
    tokens = sum(int(batch.target_mask()[:, 1:].sum()) for batch in teachers)
    return positions, tokens


def reads_the_same(student: LatentBatch, teacher: LatentBatch) -> bool:
    """Whether the teacher batch is the student batch: a curriculum's written stage, where no mark is a
    block yet, so the teacher's forward would repeat the student's."""
    return (not bool(student.latent_mask.any()) and torch.equal(student.input_ids, teacher.input_ids)
            and torch.equal(student.attention_mask, teacher.attention_mask)
            and torch.equal(student.target_mask(), teacher.target_mask()))


def distill_terms(model: LatentModel, batch: LatentBatch, student: ForwardOutput, teacher: LatentBatch,
                  counts: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's shares of (distillation, teacher next-token loss); `student` was computed from
    `batch` with `anchors=batch.anchor_mask` (the students' anchors, `distill_pair`), the teacher batch rows
    are the same problems in the same order. When the teacher reads exactly what the student read, its loss is taken from the student's
    states instead of a second forward (same value and gradient, half the work of a written stage)."""
    positions, tokens = counts
    if reads_the_same(batch, teacher):
        hidden, distill = student.hidden, student.hidden.new_zeros(())
    else:
        out = forward(model, teacher, anchors=teacher.anchor_mask)
        if student.layers.shape[1] != out.layers.shape[1]:
            raise ValueError(f"{student.layers.shape[1]} student anchors but {out.layers.shape[1]} teacher anchors")
        hidden, distill = out.hidden, distill_loss(student.layers, out.layers) / max(positions, 1)
    teacher_lm = token_losses(model, teacher, hidden, teacher.target_mask()).sum() / max(tokens, 1)
    return distill, teacher_lm
