"""Read a run's latent blocks as text: which tokens its latents sit next to, and whether a block writes its
step's partial results.

Every latent of an evaluation sample is recorded with its top LM-head tokens and its nearest input
embeddings (`rlatent.run.evaluate.nearest_tokens`, best first). Blocks trained to stand for a written chain
(`sft.compress`, `latent.proj: soft`) feed back mixtures of token embeddings, so joined, a block's nearest
tokens read like the chain it stands for (" 17 + 14 = 31, 31 + 2 ="). `block_counts` counts, over problems,
whether the first block writes the operands of its step's first operation and each of the step's partial
results but the last (31 for `17+14+2`, operations in evaluation order, `rlatent.data.marks.operations`;
the last result is written after the block). Read against the next problem's solution instead, the same
counts give the rate at which a block writes numbers that are not its problem's (chance): a block that
computes serially writes its partial results; one that holds nothing of the problem does so at chance.
"""

from __future__ import annotations

import re
from collections import Counter

from rlatent.data.examples import LATENT_TEXT
from rlatent.data.gsm8k import Problem
from rlatent.data.marks import canonical_number, operations, parse_marks
from rlatent.errors import DataError

READINGS = ("nearest_embeddings", "lm_head")  # the two ways a sample records each latent
COMMONEST = 10  # tokens listed per reading


def block_texts(sample: dict, reading: str = "nearest_embeddings") -> list[str]:
    """Each latent block of a sample as the text of its latents' first token under `reading` (one of
    `READINGS`), the blocks cut from the latents by the `[z]` runs of the sample's `with_latents`."""
    if not {"with_latents", "latents"} <= sample.keys():
        raise DataError(f"{sample['source']}: a sample needs 'with_latents' and 'latents' to read its blocks")
    runs = re.findall(rf"(?:{re.escape(LATENT_TEXT)})+", sample["with_latents"])
    sizes = [len(run) // len(LATENT_TEXT) for run in runs]
    tokens = [latent[reading][0] for latent in sample["latents"]]
    if sum(sizes) != len(tokens):
        raise DataError(f"{sample['source']}: {sum(sizes)} latents shown, {len(tokens)} recorded")
    texts, start = [], 0
    for size in sizes:
        texts.append("".join(tokens[start : start + size]))
        start += size
    return texts


def latent_tokens(samples: list[dict]) -> dict:
    """The latents of `samples` read as tokens: per reading the commonest first tokens with their counts,
    and per answer its blocks as text under both readings."""
    latents = [latent for sample in samples for latent in sample.get("latents", [])]
    return {"answers": len(samples), "latents": len(latents),
            "commonest": {reading: Counter(latent[reading][0] for latent in latents).most_common(COMMONEST)
                          for reading in READINGS},
            "blocks": [{"source": s["source"], "correct": s.get("correct"),
                        **{reading: block_texts(s, reading) for reading in READINGS}} for s in samples]}


def writes(text: str, number: str) -> bool:
    """Whether `text` writes `number` as a whole number (not inside a longer one)."""
    return re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", text.replace(" ", "")) is not None


def counts(blocks: dict[str, list[str]], answers: dict[str, str]) -> tuple[list[int], list[list[int]]]:
    """Over problems (by source): [first blocks writing both operands of the step's first operation, first
    blocks], and per operation but the last, [first blocks writing its partial result, first blocks]; the
    block of `blocks[source]` read against the solution `answers[source]`."""
    operands, partials = [0, 0], []
    for source, texts in blocks.items():
        marks = parse_marks(answers[source])
        ops = operations(marks[0].expression) if marks and texts else []
        if not ops:
            continue
        text = texts[0]
        operands[0] += writes(text, canonical_number(ops[0].left)) and writes(text, canonical_number(ops[0].right))
        operands[1] += 1
        for index, op in enumerate(ops[:-1]):  # the last result is written after the block, as text
            while len(partials) <= index:
                partials.append([0, 0])
            partials[index][0] += writes(text, canonical_number(op.value))
            partials[index][1] += 1
    return operands, partials


def block_counts(answered: list[tuple[Problem, dict]]) -> dict:
    """`counts` for the samples of `answered` (each with its problem) against their own problems (`own`) and
    against the next problem's solution (`next_problem`: the rate at which a block writes another problem's
    numbers, chance)."""
    blocks = {problem.source: block_texts(sample) for problem, sample in answered}
    own = {problem.source: problem.answer for problem, _ in answered}
    sources = list(own)
    other = {source: own[sources[(i + 1) % len(sources)]] for i, source in enumerate(sources)}
    result = {"problems": len(answered)}
    for name, answers in (("own", own), ("next_problem", other)):
        operands, partials = counts(blocks, answers)
        result[name] = {"first_operands_written": operands[0], "first_blocks": operands[1],
                        "partial_results_written": [{"operation": i + 1, "written": w, "blocks": n}
                                                    for i, (w, n) in enumerate(partials)]}
    return result


def render_tokens(tokens: dict, shown: int = 5) -> str:
    """The commonest tokens of each reading, then the first `shown` answers' blocks as nearest tokens."""
    lines = [f"{tokens['latents']} latents in {tokens['answers']} answers; commonest first tokens:",
             "| reading | tokens (count) |", "|---|---|"]
    for reading, common in tokens["commonest"].items():
        lines.append(f"| {reading} | " + ", ".join(f"{token!r} ({n})" for token, n in common) + " |")
    lines += ["", "| answer | correct | blocks as nearest tokens |", "|---|---|---|"]
    for answer in tokens["blocks"][:shown]:
        lines.append(f"| {answer['source']} | {answer['correct']} | "
                     + " / ".join(repr(text) for text in answer["nearest_embeddings"]) + " |")
    return "\n".join(lines)


def render_counts(result: dict) -> str:
    own, other = result["own"], result["next_problem"]
    lines = [f"{result['problems']} problems (first block; its own problem / the next problem's)",
             f"  operands of the first operation: {own['first_operands_written']} / "
             f"{other['first_operands_written']} of {own['first_blocks']}"]
    for mine, theirs in zip(own["partial_results_written"], other["partial_results_written"]):
        lines.append(f"  partial result {mine['operation']}: {mine['written']} / {theirs['written']} of "
                     f"{mine['blocks']}")
    return "\n".join(lines)
