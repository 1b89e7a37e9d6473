"""Accuracy and paired tests between samples files graded on the same problems.

    python scripts/paired_samples.py NAME=PATH [NAME=PATH ...] [--json OUT]

Each PATH is a samples file that a run or `rlatent eval` wrote (`samples/eval_samples*.jsonl`,
`evals/<time>/samples.jsonl`), holding every problem (`eval.num_samples >= eval.limit`). Where
`scripts/ladder_table.py` reads whole run directories, this compares single evaluations, such as one
checkpoint evaluated again with other test-time settings. Per file: accuracy with its Wilson 95 % interval;
per pair: the problems only one of them got right and the exact McNemar p. Files graded on other problems
are refused (the test would pair unrelated outcomes).
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

from rlatent.run.stats import discordant_pairs, mcnemar_exact, wilson_interval


def outcomes(path: Path) -> dict[str, int]:
    """Problem source -> 1 if answered right, 0 if not."""
    with path.open() as handle:
        return {row["source"]: int(bool(row["correct"])) for row in map(json.loads, handle)}


def compare(files: dict[str, Path]) -> dict:
    graded = {name: outcomes(path) for name, path in files.items()}
    problems = next(iter(graded.values())).keys()
    for name, result in graded.items():
        if result.keys() != problems:
            raise SystemExit(f"paired_samples: {files[name]} is graded on other problems than "
                             f"{next(iter(files.values()))}")
    order = sorted(problems)
    rows = {}
    for name, result in graded.items():
        right = sum(result.values())
        low, high = wilson_interval(right, len(order))
        rows[name] = {"path": str(files[name]), "right": right, "n": len(order), "accuracy": right / len(order),
                      "ci95": [low, high]}
    pairs = []
    for a, b in combinations(graded, 2):
        only_a, only_b = discordant_pairs([graded[a][p] for p in order], [graded[b][p] for p in order])
        pairs.append({"a": a, "b": b, "a_only": only_a, "b_only": only_b, "p": mcnemar_exact(only_a, only_b)})
    return {"rows": rows, "pairs": pairs}


def table(result: dict) -> str:
    lines = ["| row | accuracy [95% CI] |", "|---|---|"]
    lines += [f"| {name} | {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] (n={r['n']}) |"
              for name, r in result["rows"].items()]
    lines += ["", "| a | b | a only | b only | p |", "|---|---|---:|---:|---:|"]
    lines += [f"| {p['a']} | {p['b']} | {p['a_only']} | {p['b_only']} | {p['p']:.4g} |" for p in result["pairs"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", metavar="NAME=PATH")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()
    files = {}
    for item in args.files:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise SystemExit(f"paired_samples: {item!r} is not NAME=PATH of an existing samples file")
        files[name] = Path(path)
    result = compare(files)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
