"""Read a run's latent blocks as text: does a block write its step's partial results?

    python scripts/latent_text.py RUN [SAMPLES] [key=value ...] [--split test|ood] [--json OUT]

Blocks trained to stand for a written chain (`sft.compress`, `latent.proj: soft`) feed back mixtures of
token embeddings, so each latent has a nearest input embedding, which the samples files record
(`latents[i].nearest_embeddings`, best first). Joined, a block's nearest tokens read like the chain it
stands for (" 17 + 14 = 31, 31 + 2 ="). For every problem this counts whether the first block writes the
operands of its step's first operation and each of the step's partial results but the last (31 for
`17+14+2`, operations in evaluation order, `rlatent.data.marks.operations`; the last result is written
after the block). Read against the next problem's solution instead, the same counts give the rate at which
a block writes numbers that are not its problem's (chance). A block that computes serially writes its
partial results; one that holds nothing of the problem does so at chance.

RUN's `config.yaml` regenerates the problems (the `key=value` overrides apply on top, for a config a
newer check refuses); SAMPLES defaults to the run's final evaluation of `--split`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from rlatent.config import load_config
from rlatent.data.examples import LATENT_TEXT
from rlatent.data.marks import canonical_number, operations, parse_marks
from rlatent.data.splits import load_split

SAMPLES = {"test": "eval_samples.jsonl", "ood": "eval_samples_ood.jsonl"}


def block_texts(sample: dict) -> list[str]:
    """Each latent block of a sample as the text of its latents' nearest tokens."""
    runs = re.findall(rf"(?:{re.escape(LATENT_TEXT)})+", sample["with_latents"])
    sizes = [len(run) // len(LATENT_TEXT) for run in runs]
    tokens = [latent["nearest_embeddings"][0] for latent in sample["latents"]]
    if sum(sizes) != len(tokens):
        raise ValueError(f"{sample['source']}: {sum(sizes)} latents shown, {len(tokens)} recorded")
    texts, start = [], 0
    for size in sizes:
        texts.append("".join(tokens[start : start + size]))
        start += size
    return texts


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


def read(run: Path, samples: Path, split: str, overrides: list[str]) -> dict:
    """The counts of `counts` for the samples' own problems, and against the next problem's solution (the
    rate at which a block writes another problem's numbers: chance)."""
    cfg = load_config(str(run / "config.yaml"), overrides)
    problems = {p.source: p for p in load_split(cfg.data, split)[0]}
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    blocks = {row["source"]: block_texts(row) for row in rows}
    sources = list(blocks)
    own = {s: problems[s].answer for s in sources}
    other = {s: problems[sources[(i + 1) % len(sources)]].answer for i, s in enumerate(sources)}
    result = {"samples": str(samples), "problems": len(rows)}
    for name, answers in (("own", own), ("next_problem", other)):
        operands, partials = counts(blocks, answers)
        result[name] = {"first_operands_written": operands[0], "first_blocks": operands[1],
                        "partial_results_written": [{"operation": i + 1, "written": w, "blocks": n}
                                                    for i, (w, n) in enumerate(partials)]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("rest", nargs="*", help="[SAMPLES] [key=value ...]")
    parser.add_argument("--split", choices=tuple(SAMPLES), default="test")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    overrides = [item for item in args.rest if "=" in item]
    paths = [Path(item) for item in args.rest if "=" not in item]
    samples = paths[0] if paths else args.run / "samples" / SAMPLES[args.split]
    result = read(args.run, samples, args.split, overrides)
    print(f"{samples}: {result['problems']} problems (first block; its own problem / the next problem's)")
    own, other = result["own"], result["next_problem"]
    print(f"  operands of the first operation: {own['first_operands_written']} / {other['first_operands_written']}"
          f" of {own['first_blocks']}")
    for mine, theirs in zip(own["partial_results_written"], other["partial_results_written"]):
        print(f"  partial result {mine['operation']}: {mine['written']} / {theirs['written']} of {mine['blocks']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
