"""What each aligned slot of a block reads as: does a block hold a step's partial results, slot by slot?

    python scripts/slot_readout.py runs/multiop_split/latent_pplus_split_k2-seed0 [RUN ...] [--json OUT]

A block's answer-level accuracy cannot tell a block that computes the first operation of a two-operation step
and loses the second from one that computes nothing. The stepwise teacher of self-distillation
(`sft.distill.split_steps`) names the state each slot should reach: the written chain's state where it is
about to write that partial result (`12 * 7 = ` before 84). This script reads every such slot through the
model's own LM head on the held-out problems of each run directory (its `config.yaml` regenerates them, its
latest checkpoint is loaded): per slot role (partial result j of a step of m operations), how often the digit
the slot ranks highest (of the ten digit tokens) is that partial result's first digit. SmolLM2 writes a
number digit by digit after a lone space token, so the next token any of these states predicts is that space;
the digit ranking is the logit lens on what the state holds. The teacher's own state at its anchor is read
the same way (what the written chain holds there), and the commonest first digit of each role is the rate of
a constant guess. Slots are aligned as the stepwise teacher aligns them whether or not the run trained with
it, so runs trained without it are read the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rlatent.config import load_config
from rlatent.data.examples import special_token_ids
from rlatent.data.marks import canonical_number, operations, parse_marks
from rlatent.data.splits import load_split
from rlatent.latent.batch import collate
from rlatent.latent.forward import forward
from rlatent.run.api import load
from rlatent.sft.curriculum import Curriculum, staged_examples


def roles(problem, k: int) -> list[tuple[str, str]]:
    """Per aligned slot of `problem`'s blocks, in order: ("j/m", first digit of partial result j of a step of
    m operations); a step left whole, or of one operation, is "1/1" with its result's first digit."""
    found = []
    for mark in parse_marks(problem.answer):
        steps = operations(mark.expression)
        values = [canonical_number(s.value) for s in steps] if 2 <= len(steps) <= k else [mark.result]
        found += [(f"{j + 1}/{len(values)}", value.lstrip("-$")[0]) for j, value in enumerate(values)]
    return found


def digit_ids(tokenizer) -> list[int]:
    """The token ids of "0" .. "9" (one token each, as SmolLM2 writes digits)."""
    ids = [tokenizer.encode(str(d), add_special_tokens=False) for d in range(10)]
    if any(len(i) != 1 for i in ids):
        raise ValueError("this tokenizer does not write each digit as one token; the readout needs it")
    return [i[0] for i in ids]


@torch.no_grad()
def readout(run: Path, batch_size: int) -> dict:
    """Per slot role: slots, the slots and teacher anchors whose top digit is right, the commonest digit's count."""
    cfg = load_config(str(run / "config.yaml"))
    policy = load(run, device="cpu", dtype="float32")
    model, tokenizer = policy.model, policy.tokenizer
    problems = load_split(cfg.data, "test", cfg.eval.limit)[0]
    staged = staged_examples(problems, tokenizer, cfg.latent, 10 ** 6, Curriculum(0, 1), teachers=True,
                             split_steps=cfg.latent.k >= 2)
    students, teachers = staged.stages[-1], staged.teachers[-1]
    _, pad_id = special_token_ids(tokenizer)
    digits = digit_ids(tokenizer)
    tallies: dict[str, dict] = {}
    for offset in range(0, len(problems), batch_size):
        rows = range(offset, min(offset + batch_size, len(problems)))
        student, teacher = collate([students[i] for i in rows], pad_id), collate([teachers[i] for i in rows], pad_id)
        read = [model.token_logits(forward(model, b).hidden[b.anchor_mask])[:, digits].argmax(-1).tolist()
                for b in (student, teacher)]
        slots = [slot for i in rows for slot in roles(problems[i], cfg.latent.k)]
        if not len(slots) == len(read[0]) == len(read[1]):
            raise ValueError(f"{run}: {len(slots)} slot roles, {len(read[0])} student and {len(read[1])} "
                             "teacher anchors")
        for (role, digit), mine, taught in zip(slots, *read):
            tally = tallies.setdefault(role, {"slots": 0, "student_right": 0, "teacher_right": 0, "digits": {}})
            tally["slots"] += 1
            tally["student_right"] += str(mine) == digit
            tally["teacher_right"] += str(taught) == digit
            tally["digits"][digit] = tally["digits"].get(digit, 0) + 1
    for tally in tallies.values():
        tally["commonest_digit"] = max(tally.pop("digits").values())
    return {"run": str(run), "mode": cfg.latent.mode, "k": cfg.latent.k,
            "split_steps": cfg.sft.distill.split_steps, "problems": len(problems),
            "slots": dict(sorted(tallies.items()))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--json", type=Path, help="write the counts here too")
    args = parser.parse_args(argv)
    results = [readout(run, args.batch_size) for run in args.runs]
    print("| run | slot (partial j of m) | slots | slot's top digit right | written chain's | commonest digit |")
    print("|---|---|---:|---:|---:|---:|")
    for result in results:
        for role, c in result["slots"].items():
            print(f"| {result['run']} | {role} | {c['slots']} | {c['student_right']} ({c['student_right'] / c['slots']:.0%})"
                  f" | {c['teacher_right']} ({c['teacher_right'] / c['slots']:.0%})"
                  f" | {c['commonest_digit']} ({c['commonest_digit'] / c['slots']:.0%}) |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
