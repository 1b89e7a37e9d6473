"""Which answers a policy gives, file against file: the drift of a phase 2 towards one answer, read off.

    python experiments/tools/answer_counts.py runs/ladder_nz/latent-seed0/samples/eval_samples.jsonl \
        runs/ladder_nz/latent_long-seed0/samples/eval_samples.jsonl [--answers 1 21] [--top 5]

A reward for right answers pays a policy that says the commonest answer of its training prompts without
reading them, so a phase 2 that learns nothing else shows up as one answer taking over. For each samples
file (written with `eval.num_samples >= eval.limit`, so that it holds every problem): problems, right
answers, distinct answers, the commonest answers with how often each was given and how often it was right,
and the same for each `--answers` value (say the training set's commonest answer, which the evaluation's own
`constant answer` row need not be).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def answer_counts(path: Path, answers: list[str], top: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    said = Counter(row["predicted"] for row in rows)
    right = Counter(row["predicted"] for row in rows if row["correct"])
    lines = [f"{path}: {len(rows)} problems, {sum(right.values())} right, {len(said)} distinct answers "
             f"({said[None]} without one)"]
    shown = [a for a, _ in said.most_common() if a is not None][:top] + answers
    for answer in dict.fromkeys(shown):
        lines.append(f"  {answer!r}: said {said[answer]}, right {right[answer]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", nargs="+", type=Path, help="samples files (eval_samples*.jsonl)")
    parser.add_argument("--answers", nargs="*", default=[], help="answers to count in every file")
    parser.add_argument("--top", type=int, default=5, help="how many of the commonest answers to list")
    args = parser.parse_args()
    for path in args.samples:
        if not path.is_file():
            parser.error(f"{path}: no such samples file")
        print("\n".join(answer_counts(path, args.answers, args.top)))


if __name__ == "__main__":
    main()
