"""How often each step's written result is right: whether a block computes one step, read off per step.

Final-answer accuracy near the base rate cannot tell a policy that computes nothing from one that gets the
first step right and loses the chain later. Every answer line of the seeded arithmetic task holds one
calculator mark, and every row of the ladder still writes each step's result after it (`replace` removes the
expression, not the result), so the completion's line j can be held against the reference's mark j. Per
step: the problems that have it, how many wrote its result right, and how many did given that the step
before was right. A step's outcome is the `gsm8k_steps` reward's (`rlatent.data.grading.step_outcomes`):
the first number after the line's last `=` (a written expression), else its first number, equals the
step's result.

Two runs are also tested against each other step by step on the same problems (exact McNemar on the
problems only one of them got right at that step): counts of right steps from two rows are not comparable
without it, and runs named `<row>-seed<s>` (as `scripts/ladder.sh` names them) are pooled per row over the
seeds both rows have. Per operation, the counts tell a latent that carries an addition and not a product;
the written expressions (rows that write them, written CoT) tell a wrong choice of operations from wrong
arithmetic. `rlatent diagnose` reads the rows, `(source, the reference's marks, the completion)`, from a
run's samples files.
"""

from __future__ import annotations

import re
from fractions import Fraction
from itertools import combinations
from pathlib import Path

from rlatent.data.examples import written_expression
from rlatent.data.grading import step_lines, step_outcomes
from rlatent.data.marks import Mark, evaluate_expression
from rlatent.errors import DataError
from rlatent.run.stats import discordant_pairs, mcnemar_exact

WRITTEN_SIGNS = str.maketrans({"x": "*", "X": "*", "\u00d7": "*", "\u00f7": "/", "\u2013": "-", "$": None,
                               "\u20ac": None, "\u00a3": None, "\u00a2": None})  # as written -> as evaluated
Rows = list[tuple[str, list[Mark], str]]  # per answered problem: its source, the reference's marks, the completion


def step_report(rows: Rows) -> tuple[dict[str, list[dict]], dict[str, list[bool]]]:
    """One run's counts on one split, per step (`steps`), per step and operation (`by_operation`) and of
    the written expressions (`expressions`); and its per-problem outcomes, which `paired_runs` pairs."""
    outcomes = step_results(rows)
    return {"steps": step_counts(outcomes), "by_operation": step_counts(outcomes, step_operations(rows)),
            "expressions": expression_counts(rows, outcomes)}, outcomes


def step_results(rows: Rows) -> dict[str, list[bool]]:
    """Per problem (by source), whether each of its reference steps was right."""
    return {source: step_outcomes(completion, [m.result for m in marks]) for source, marks, completion in rows}


def step_operations(rows: Rows) -> dict[str, list[str]]:
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


def expression_counts(rows: Rows, outcomes: dict[str, list[bool]]) -> list[dict]:
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


def paired_runs(outcomes: dict[str, dict[str, dict[str, list[bool]]]]) -> list[dict]:
    """Every pair of runs of each split (`outcomes`: split -> run -> `step_results`), step by step."""
    paired = []
    for split, runs in outcomes.items():
        for a, b in combinations(runs, 2):
            paired += [{"a": a, "b": b, "split": split, **row} for row in paired_steps(runs[a], runs[b])]
    return paired


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
