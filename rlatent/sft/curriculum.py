"""A Coconut-style curriculum for phase 1 (`sft.curriculum`): stages that move from text to latents.

Stage 0 is the written chain of thought (no latents); stage s turns the first s
calculator marks of every answer into latent blocks and leaves the others
written; after `stages` stages every mark is a block, for the rest of phase 1.
Coconut (arXiv 2412.06769) fell from 34.1 % to 14.4 % on GSM8K without its
curriculum, and a pause-token control trained with the same curriculum matched
it in distribution (B. Martin, "The Curriculum Is the Mechanism"; checkpoints on the Hugging Face hub as
`bmarti44/coconut-curriculum-checkpoints`). The
pause and no-CoT controls therefore run through the same stages (their mode
decides what a converted mark becomes), so a comparison between modes compares
mechanisms, not schedules.

Examples of every stage are built up front and aligned by problem (a problem
too long at any stage is dropped from all), so the data order, and a resumed
run's position in it, do not depend on the stage. So are the written-chain
teachers of self-distillation (`sft.distill`), one per problem and stage, and
the slots' written pieces of compressed-chain training (`sft.compress`).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlatent.config import LatentConfig, SFTConfig
from rlatent.data.examples import SFTExample
from rlatent.data.splits import sft_examples
from rlatent.sft.compress import compress_example
from rlatent.sft.distill import distill_pair


@dataclass(frozen=True)
class Curriculum:
    stages: int  # 0 = off
    steps_per_stage: int

    @classmethod
    def from_config(cls, sft: SFTConfig) -> "Curriculum":
        return cls(sft.curriculum.stages, sft.curriculum.steps_per_stage)

    def stage(self, step: int) -> int:
        """The stage of the optimizer step `step` (0-based); `stages` is the final, all-latent one."""
        return min(step // self.steps_per_stage, self.stages) if self.stages else 0

    def latent_marks(self, stage: int) -> int | None:
        """Marks turned into latents at `stage` (None: all)."""
        return None if stage >= self.stages else stage


@dataclass
class StagedExamples:
    """Per stage (0 .. stages; the last is all-latent) the examples, aligned by problem; with `sft.distill`
    the written-chain teachers of each stage, aligned the same way; and how many problems were dropped for
    being too long at some stage."""

    stages: list[list[SFTExample]]
    teachers: list[list[SFTExample]] | None
    dropped: int


def staged_examples(problems, tokenizer, latent: LatentConfig, max_length: int, curriculum: Curriculum,
                    teachers: bool = False, split_steps: bool = False, chains: bool = False,
                    tokens_per_latent: int | None = None, random_factor: bool = False) -> StagedExamples:
    """The examples of `problems` at every stage, and with `teachers` their teachers (`rlatent.sft.distill`);
    with `chains` each slot's piece of the written chain (`rlatent.sft.compress`). Stepwise teachers or
    chains with `split_steps` (a mark of up to `latent.k` operations written one step per operation). With
    `tokens_per_latent` (c) each block has a slot per c tokens of its chain (`sft.compress.tokens_per_latent`),
    with `random_factor` a c of each problem's own (`sft.compress.random_factor`)."""
    split_up_to = latent.k if split_steps else 1
    stages = [sft_examples(problems, tokenizer, latent, None, curriculum.latent_marks(s), tokens_per_latent,
                           split_up_to, random_factor)[0]
              for s in range(curriculum.stages + 1)]
    if chains:
        stages = [[compress_example(problem, student, tokenizer, curriculum.latent_marks(s), split_up_to)
                   for problem, student in zip(problems, stage)]
                  for s, stage in enumerate(stages)]
    taught = None
    if teachers:
        pairs = [[distill_pair(problem, student, tokenizer, curriculum.latent_marks(s), split_up_to)
                  for problem, student in zip(problems, stage)]
                 for s, stage in enumerate(stages)]
        stages = [[student for student, _ in stage] for stage in pairs]
        taught = [[teacher for _, teacher in stage] for stage in pairs]
    every = stages + (taught or [])
    keep = [i for i in range(len(problems)) if all(len(stage[i].input_ids) <= max_length for stage in every)]
    return StagedExamples([[stage[i] for i in keep] for stage in stages],
                          None if taught is None else [[stage[i] for i in keep] for stage in taught],
                          len(problems) - len(keep))
