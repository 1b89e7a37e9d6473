"""How often each step's written result is right: whether a block computes one step, read off per step.

    python scripts/step_accuracy.py runs/ladder_nz/latent-seed0 runs/ladder_nz/pause-seed0 [--json OUT]

Final-answer accuracy near the base rate cannot tell a policy that computes nothing from one that gets the
first step right and loses the chain later. Every answer line of the seeded arithmetic task holds one
calculator mark, and every row of the ladder still writes each step's result after it (`replace` removes the
expression, not the result), so the completion's line j can be held against the reference's mark j. For
each run directory (its `config.yaml` regenerates the problems, its samples files hold the completions;
write them with `eval.num_samples >= eval.limit`) and split: per step, the problems that have it, how many
wrote its result right, and how many did given that the step before was right. A step's outcome is the
`gsm8k_steps` reward's (`rewards.steps.step_outcomes`): the first number after the line's last `=` (a
written expression), else its first number, equals the step's result.

With two or more run directories it also tests each pair of runs step by step on the same problems (exact
McNemar on the problems only one of them got right at that step): counts of right steps from two rows are
not comparable without it.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

from rlatent.config import load_config
from rlatent.data.marks import parse_marks
from rlatent.data.splits import load_split
from rlatent.run.stats import discordant_pairs, mcnemar_exact
from rewards.steps import step_outcomes

SAMPLES = {"test": "eval_samples.jsonl", "ood": "eval_samples_ood.jsonl"}


def split_outcomes(run: Path, split: str) -> dict[str, list[bool]] | None:
    """Per problem (by source), whether each of its reference steps was right; None without samples."""
    path = run / "samples" / SAMPLES[split]
    if not path.exists():
        return None
    cfg = load_config(str(run / "config.yaml"))
    problems = {p.source: p for p in load_split(cfg.data, split)[0]}
    outcomes = {}
    for line in path.read_text().splitlines():
        sample = json.loads(line)
        results = [m.result for m in parse_marks(problems[sample["source"]].answer)]
        outcomes[sample["source"]] = step_outcomes(sample["completion"], results)
    return outcomes


def step_counts(outcomes: dict[str, list[bool]]) -> list[dict]:
    """Per step: problems with it, right, and right after a right previous step."""
    steps: list[dict] = []
    for per_step in outcomes.values():
        for j, right in enumerate(per_step):
            if j == len(steps):
                steps.append({"step": j + 1, "problems": 0, "right": 0, "after_right": 0, "right_after_right": 0})
            row = steps[j]
            row["problems"] += 1
            row["right"] += right
            if j and per_step[j - 1]:
                row["after_right"] += 1
                row["right_after_right"] += right
    return steps


def paired_steps(a: dict[str, list[bool]], b: dict[str, list[bool]]) -> list[dict]:
    """Per step, on the problems both runs answered that have it: right only in a, only in b, McNemar p."""
    shared = sorted(a.keys() & b.keys())
    rows = []
    for j in range(max((len(a[s]) for s in shared), default=0)):
        have = [s for s in shared if len(a[s]) > j]
        only_a, only_b = discordant_pairs([a[s][j] for s in have], [b[s][j] for s in have])
        rows.append({"step": j + 1, "problems": len(have), "a_only": only_a, "b_only": only_b,
                     "p": mcnemar_exact(only_a, only_b)})
    return rows


def render(run: Path, split: str, steps: list[dict]) -> list[str]:
    lines = [f"{run} ({split})", "| step | problems | right | right given the step before right |", "|---:|---:|---|---|"]
    for row in steps:
        given = (f"{row['right_after_right']}/{row['after_right']}" if row["step"] > 1 else "")
        lines.append(f"| {row['step']} | {row['problems']} | {row['right']} ({row['right'] / row['problems']:.1%}) "
                     f"| {given} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of the seeded arithmetic task")
    parser.add_argument("--json", type=Path, help="write every count here")
    args = parser.parse_args()
    report: dict = {}
    outcomes: dict[str, dict[str, dict[str, list[bool]]]] = {}
    for run in args.runs:
        if not (run / "config.yaml").exists():
            print(f"step_accuracy: {run} is not a run directory (no config.yaml)", file=sys.stderr)
            return 2
        for split in SAMPLES:
            found = split_outcomes(run, split)
            if found is not None:
                outcomes.setdefault(split, {})[str(run)] = found
                steps = step_counts(found)
                report.setdefault(str(run), {})[split] = steps
                print("\n".join(render(run, split, steps)) + "\n")
    paired = []
    for split, runs in outcomes.items():
        for a, b in combinations(runs, 2):
            paired += [{"a": a, "b": b, "split": split, **row} for row in paired_steps(runs[a], runs[b])]
    if paired:
        print("| a | b | split | step | problems | a only | b only | p |\n|---|---|---|---:|---:|---:|---:|---:|")
        for row in paired:
            print(f"| {row['a']} | {row['b']} | {row['split']} | {row['step']} | {row['problems']} "
                  f"| {row['a_only']} | {row['b_only']} | {row['p']:.4f} |")
        report["paired"] = paired
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
