"""Where a written graph-search answer goes wrong: in the walk, or in the Yes/No after it.

    python experiments/tools/graph_walks.py runs/ladder_graph/cot-seed0/samples/eval_samples.jsonl

For each evaluated problem (a samples file of a `data.source: graph` run with the chain written): whether
every hop line the model wrote is a fact stated in the question, whether the walk ends at the concept the
question asks about (then the right answer is Yes, else No, as the generator builds its problems), and
what the model answered. Counts by (reference, walk ends at the asked concept, predicted).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

FACT = re.compile(r"((?:Every [a-z]+|[A-Z][a-z]+) is a [a-z]+)\.")
QUESTION = re.compile(r"Is (?:every )?.+? an? ([a-z]+)\?$")


def walk(completion: str) -> list[str]:
    """The hop lines of a written answer, without their full stop (the conclusion "So ..." is not a hop)."""
    return [line.strip().rstrip(".") for line in completion.splitlines()
            if " is a " in line and not line.startswith("So")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", type=Path, help="an eval_samples*.jsonl of a graph run")
    rows = [json.loads(line) for line in parser.parse_args().samples.read_text().splitlines() if line.strip()]
    counts, stated = Counter(), 0
    for row in rows:
        hops = walk(row["completion"])
        facts = set(FACT.findall(row["question"]))
        stated += bool(hops) and all(hop in facts for hop in hops)
        asked = QUESTION.search(row["question"]).group(1)
        ends_there = bool(hops) and hops[-1].rsplit(" is a ", 1)[1] == asked
        counts[(row["reference"], ends_there, row["predicted"])] += 1
    print(f"problems: {len(rows)}; every hop line a stated fact: {stated}")
    print("| reference | walk ends at the asked concept | predicted | problems |\n|---|---|---|---:|")
    for (reference, ends_there, predicted), n in sorted(counts.items(), key=str):
        print(f"| {reference} | {ends_there} | {predicted} | {n} |")
    follows = sum(n for (_, ends_there, predicted), n in counts.items() if (predicted == "Yes") == ends_there)
    right_walk = sum(n for (reference, ends_there, _), n in counts.items() if (reference == "Yes") == ends_there)
    print(f"\nanswer follows the walk: {follows}/{len(rows)}; walk's end gives the reference: {right_walk}/{len(rows)}")


if __name__ == "__main__":
    main()
