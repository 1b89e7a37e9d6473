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
not comparable without it. `--by-operation` also splits each run's counts by the step's operation (a
latent may carry an addition and not a product). Run directories named `<row>-seed<s>` (as
`scripts/ladder.sh` names them) are also pooled per row: for each pair of rows, the discordant counts of the
seeds both rows have are summed per step and tested once, as `scripts/ladder_table.py` pools final answers.
`--expressions` is for rows that write their expressions (written CoT): per step, how many lines write one,
how many of those evaluate to the step's result (the right operations on the right numbers), and how many
of those also state the right result, which tells a wrong choice of operations from wrong arithmetic.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from fractions import Fraction
from itertools import combinations
from pathlib import Path

from rlatent.config import load_config
from rlatent.data.examples import written_expression
from rlatent.data.marks import Mark, evaluate_expression, parse_marks
from rlatent.data.splits import load_split
from rlatent.errors import DataError
from rlatent.run.stats import discordant_pairs, mcnemar_exact
from rewards.steps import step_lines, step_outcomes

SAMPLES = {"test": "eval_samples.jsonl", "ood": "eval_samples_ood.jsonl"}
WRITTEN_SIGNS = str.maketrans({"x": "*", "X": "*", "\u00d7": "*", "\u00f7": "/", "\u2013": "-", "$": None,
                               "\u20ac": None, "\u00a3": None, "\u00a2": None})  # as written -> as evaluated


def answered(run: Path, split: str) -> list[tuple[str, list[Mark], str]] | None:
    """Per answered problem: its source, the reference solution's marks and the completion; None without
    samples."""
    path = run / "samples" / SAMPLES[split]
    if not path.exists():
        return None
    cfg = load_config(str(run / "config.yaml"))
    problems = {p.source: p for p in load_split(cfg.data, split)[0]}
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
        if not isinstance(sample, dict) or not {"source", "completion"} <= sample.keys():
            raise ValueError(f"{path}:{number}: a sample needs 'source' and 'completion'")
        samples.append(sample)
    unknown = next((s["source"] for s in samples if s["source"] not in problems), None)
    if unknown is not None:
        raise ValueError(f"{path}: problem {unknown!r} is not in the {split} split that {run / 'config.yaml'} "
                         "generates (samples from another configuration?)")
    return [(s["source"], parse_marks(problems[s["source"]].answer), s["completion"]) for s in samples]


def step_results(rows: list[tuple[str, list[Mark], str]]) -> dict[str, list[bool]]:
    """Per problem (by source), whether each of its reference steps was right."""
    return {source: step_outcomes(completion, [m.result for m in marks]) for source, marks, completion in rows}


def step_operations(rows: list[tuple[str, list[Mark], str]]) -> dict[str, list[str]]:
    """Per problem (by source), the operation of each reference step (`operation`)."""
    return {source: [operation(m.expression) for m in marks] for source, marks, _ in rows}


def operation(expression: str) -> str:
    """A mark's operators in order, a leading sign not counted: `12*7` -> `*`, `(43+13)*5` -> `+*`."""
    return "".join(re.findall(r"(?<=[\d.)])[-+*/]", expression.replace(" ", ""))) or "none"


def written_value(line: str) -> Fraction | None:
    """The value of the arithmetic a line writes before its last `=`; None when it writes none (no
    operator: a stated number is not a computation) or one that does not evaluate."""
    expression = written_expression(line)
    if expression is None:
        return None
    expression = expression.translate(WRITTEN_SIGNS)
    if operation(expression) == "none":
        return None
    try:
        return evaluate_expression(expression)
    except DataError:
        return None


def expression_counts(rows: list[tuple[str, list[Mark], str]], outcomes: dict[str, list[bool]]) -> list[dict]:
    """Per step: problems with it, lines that write an expression, expressions whose value is the step's
    result, and of those the lines whose stated result is right too (`outcomes`, from `step_results`)."""
    counts: dict[int, dict] = {}
    for source, marks, completion in rows:
        lines = step_lines(completion)
        for j, mark in enumerate(marks):
            row = counts.setdefault(j, {"step": j + 1, "problems": 0, "written": 0, "expression_right": 0,
                                        "result_right_given_expression_right": 0})
            row["problems"] += 1
            value = written_value(lines[j]) if j < len(lines) else None
            row["written"] += value is not None
            if value == mark.value:
                row["expression_right"] += 1
                row["result_right_given_expression_right"] += outcomes[source][j]
    return [counts[j] for j in sorted(counts)]


def render_expressions(run: Path, split: str, steps: list[dict]) -> list[str]:
    lines = [f"{run} ({split}), written expressions",
             "| step | problems | expression written | its value right | result right given the value right |",
             "|---:|---:|---:|---:|---|"]
    for row in steps:
        lines.append(f"| {row['step']} | {row['problems']} | {row['written']} | {row['expression_right']} | "
                     f"{row['result_right_given_expression_right']}/{row['expression_right']} |")
    return lines


def step_counts(outcomes: dict[str, list[bool]], operations: dict[str, list[str]] | None = None) -> list[dict]:
    """Per step (and per operation of the step, when `operations` gives them): problems with it, right, and
    right after a right previous step."""
    rows: dict[tuple[int, str], dict] = {}
    for source, per_step in outcomes.items():
        for j, right in enumerate(per_step):
            op = operations[source][j] if operations else ""
            row = rows.setdefault((j, op), {"step": j + 1, **({"operation": op} if operations else {}),
                                            "problems": 0, "right": 0, "after_right": 0, "right_after_right": 0})
            row["problems"] += 1
            row["right"] += right
            if j and per_step[j - 1]:
                row["after_right"] += 1
                row["right_after_right"] += right
    return [rows[key] for key in sorted(rows)]


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


def pooled_pairs(paired: list[dict]) -> list[dict]:
    """Per (row a, row b, split, step), the per-seed pairs of runs `<row>-seed<s>` summed over the seeds both
    rows have; a row needs two seeds or more to be pooled (one seed's pair is already in `paired`)."""
    def row_seed(run: str) -> tuple[str, str]:
        row, _, seed = Path(run).name.rpartition("-seed")
        return (row, seed) if row and seed.isdigit() else ("", "")

    sums: dict[tuple, dict] = {}
    for pair in paired:
        (row_a, seed_a), (row_b, seed_b) = row_seed(pair["a"]), row_seed(pair["b"])
        if not row_a or not row_b or seed_a != seed_b or row_a == row_b:
            continue
        only = {row_a: pair["a_only"], row_b: pair["b_only"]}
        row_a, row_b = sorted((row_a, row_b))  # the same orientation whatever order the runs were given in
        key = (row_a, row_b, pair["split"], pair["step"])
        total = sums.setdefault(key, {"a": row_a, "b": row_b, "split": pair["split"], "step": pair["step"],
                                      "seeds": [], "problems": 0, "a_only": 0, "b_only": 0})
        total["seeds"].append(int(seed_a))
        total["problems"] += pair["problems"]
        total["a_only"] += only[row_a]
        total["b_only"] += only[row_b]
    pooled = [row for row in sums.values() if len(row["seeds"]) > 1]
    for row in pooled:
        row["p"] = mcnemar_exact(row["a_only"], row["b_only"])
    return pooled


def render_pairs(pairs: list[dict], seeds: bool = False) -> str:
    head = "| a | b | split | step |" + (" seeds |" if seeds else "") + " problems | a only | b only | p |"
    lines = [head, "|---|---|---|---:|" + ("---|" if seeds else "") + "---:|---:|---:|---:|"]
    for row in pairs:
        seed_cell = f" {','.join(map(str, row['seeds']))} |" if seeds else ""
        lines.append(f"| {row['a']} | {row['b']} | {row['split']} | {row['step']} |{seed_cell} {row['problems']} "
                     f"| {row['a_only']} | {row['b_only']} | {row['p']:.4f} |")
    return "\n".join(lines)


def render(run: Path, split: str, steps: list[dict]) -> list[str]:
    by_op = bool(steps) and "operation" in steps[0]
    lines = [f"{run} ({split})" + (", by operation" if by_op else ""),
             "| step |" + (" operation |" if by_op else "") + " problems | right | right given the step before right |",
             "|---:|" + ("---|" if by_op else "") + "---:|---|---|"]
    for row in steps:
        given = (f"{row['right_after_right']}/{row['after_right']}" if row["step"] > 1 else "")
        op_cell = f" {row['operation']} |" if by_op else ""
        lines.append(f"| {row['step']} |{op_cell} {row['problems']} | {row['right']} "
                     f"({row['right'] / row['problems']:.1%}) | {given} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of the seeded arithmetic task")
    parser.add_argument("--json", type=Path, help="write every count here")
    parser.add_argument("--by-operation", action="store_true",
                        help="also count each step per operation (`+`, `*`, `+*` for a two-operation step, ...)")
    parser.add_argument("--expressions", action="store_true",
                        help="also count the written expressions whose value is right (rows that write them)")
    args = parser.parse_args()
    report: dict = {}
    outcomes: dict[str, dict[str, dict[str, list[bool]]]] = {}
    for run in args.runs:
        if not (run / "config.yaml").exists():
            print(f"step_accuracy: {run} is not a run directory (no config.yaml)", file=sys.stderr)
            return 2
        for split in SAMPLES:
            try:
                rows = answered(run, split)
            except ValueError as error:
                print(f"step_accuracy: {error}", file=sys.stderr)
                return 2
            if rows is not None:
                found = step_results(rows)
                outcomes.setdefault(split, {})[str(run)] = found
                steps = step_counts(found)
                report.setdefault(str(run), {})[split] = steps
                print("\n".join(render(run, split, steps)) + "\n")
                if args.by_operation:
                    by_op = step_counts(found, step_operations(rows))
                    report[str(run)][f"{split}_by_operation"] = by_op
                    print("\n".join(render(run, split, by_op)) + "\n")
                if args.expressions:
                    written = expression_counts(rows, found)
                    report[str(run)][f"{split}_expressions"] = written
                    print("\n".join(render_expressions(run, split, written)) + "\n")
    paired = []
    for split, runs in outcomes.items():
        for a, b in combinations(runs, 2):
            paired += [{"a": a, "b": b, "split": split, **row} for row in paired_steps(runs[a], runs[b])]
    if paired:
        print(render_pairs(paired))
        report["paired"] = paired
    pooled = pooled_pairs(paired)
    if pooled:
        print("\nPooled over seeds (rows `<row>-seed<s>`, the seeds both rows have):\n" + render_pairs(pooled, True))
        report["pooled"] = pooled
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
