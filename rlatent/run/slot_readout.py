"""What each aligned slot of a block reads as: does a block hold a step's partial results, slot by slot?

A block's answer-level accuracy cannot tell a block that computes the first operation of a two-operation step
and loses the second from one that computes nothing. The stepwise teacher of self-distillation
(`sft.distill.split_steps`) names the state each slot should reach: the written chain's state where it is
about to write that partial result (`12 * 7 = ` before 84). `readout` asks each such slot what the model
would write if the block ended there: on the held-out problems, the student's sequence is cut after the
slot, the token the written chain puts before the partial result is appended (a lone space in SmolLM2, which
writes numbers digit by digit), and the model's most likely next token there is held against the partial
result's first token. The written chain is read the same way, at that token in its own text (how often a
chain that wrote both operations gets the partial result's first digit), and the commonest first token of
each role is the rate of a constant guess. Per slot role (partial result j of a step of m operations, slots
aligned as the stepwise teacher aligns them whether or not the run trained with it): slots, right readouts.
For the closing slot this is the model's own next token after the block, teacher-forced.
"""

from __future__ import annotations

from collections import Counter

import torch

from rlatent.config import RunConfig
from rlatent.data.examples import SFTExample, special_token_ids, split_marks
from rlatent.data.gsm8k import Problem
from rlatent.errors import DataError
from rlatent.latent.batch import collate
from rlatent.latent.forward import forward
from rlatent.model.latent_model import LatentModel
from rlatent.sft.curriculum import Curriculum, staged_examples


def roles(problem: Problem, k: int) -> list[str]:
    """Per aligned slot of `problem`'s blocks, in order: "j/m", partial result j of a step the stepwise teacher
    writes as m operations (`split_marks`; a step it leaves whole is "1/1")."""
    return [f"{j + 1}/{count}" for count in split_marks(problem.answer, k)[1] for j in range(count)]


def cut_after(student: SFTExample, slot: int, lead: int) -> SFTExample:
    """`student` up to and including `slot`, then the token `lead`: the block closed after that slot."""
    length = slot + 2
    return SFTExample(student.input_ids[: slot + 1] + [lead], student.latent_mask[: slot + 1] + [False],
                      student.prompt_length, [False] * length)


def next_tokens(model: LatentModel, examples: list[SFTExample], positions: list[list[int]], pad_id: int
                ) -> list[int]:
    """The most likely next token at each of `positions[row]` of each example, row by row."""
    batch = collate(examples, pad_id)
    where = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    for row, columns in enumerate(positions):
        where[row, columns] = True
    return model.token_logits(forward(model, batch).hidden[where]).argmax(-1).tolist()


@torch.no_grad()
def readout(model: LatentModel, tokenizer, cfg: RunConfig, problems: list[Problem], batch_size: int) -> dict:
    """Per slot role over `problems`: slots, right readouts of the cut student and of the written chain, the
    commonest first token's count; `batch_size` sequences are read at once."""
    staged = staged_examples(problems, tokenizer, cfg.latent, 10 ** 6, Curriculum(0, 1), teachers=True,
                             split_steps=cfg.latent.k >= 2)
    _, pad_id = special_token_ids(tokenizer)
    probes = []  # (role, cut student, the partial result's first token)
    for problem, student, teacher in zip(problems, staged.stages[-1], staged.teachers[-1]):
        slots = roles(problem, cfg.latent.k)
        if not len(slots) == len(student.anchors) == len(teacher.anchors):
            raise DataError(f"{problem.source}: {len(slots)} slot roles, {len(student.anchors)} student "
                            f"and {len(teacher.anchors)} teacher anchors")
        for role, slot, anchor in zip(slots, student.anchors, teacher.anchors):
            lead, first = teacher.input_ids[anchor + 1], teacher.input_ids[anchor + 2]
            probes.append((role, cut_after(student, slot, lead), first))
    teachers, teacher_read, student_read = staged.teachers[-1], [], []
    for offset in range(0, len(teachers), batch_size):  # each written chain once, read after every anchor's lead
        chunk = teachers[offset : offset + batch_size]
        teacher_read += next_tokens(model, chunk, [[a + 1 for a in t.anchors] for t in chunk], pad_id)
    for offset in range(0, len(probes), batch_size):
        chunk = [cut for _, cut, _ in probes[offset : offset + batch_size]]
        student_read += next_tokens(model, chunk, [[len(cut.input_ids) - 1] for cut in chunk], pad_id)
    tallies: dict[str, dict] = {}
    for (role, _, first), mine, taught in zip(probes, student_read, teacher_read, strict=True):
        tally = tallies.setdefault(role, {"slots": 0, "student_right": 0, "teacher_right": 0, "firsts": Counter()})
        tally["slots"] += 1
        tally["student_right"] += mine == first
        tally["teacher_right"] += taught == first
        tally["firsts"][first] += 1
    for tally in tallies.values():
        tally["commonest_first"] = max(tally.pop("firsts").values())
    return {"mode": cfg.latent.mode, "k": cfg.latent.k, "split_steps": cfg.sft.distill.split_steps,
            "problems": len(problems), "slots": dict(sorted(tallies.items()))}


def render(result: dict) -> str:
    lines = ["| slot (partial j of m) | slots | block cut there writes it | written chain does | commonest |",
             "|---|---:|---:|---:|---:|"]
    for role, c in result["slots"].items():
        lines.append(f"| {role} | {c['slots']} | {c['student_right']} ({c['student_right'] / c['slots']:.0%})"
                     f" | {c['teacher_right']} ({c['teacher_right'] / c['slots']:.0%})"
                     f" | {c['commonest_first']} ({c['commonest_first'] / c['slots']:.0%}) |")
    return "\n".join(lines)
