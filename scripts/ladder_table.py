"""The control ladder's table from the run directories `scripts/ladder.sh` (or `rlatent train`) left.

    python scripts/ladder_table.py runs/ladder [--json docs/results/ladder_arith.json]

Per row (run directory `<row>-seed<s>`, pooled over seeds): accuracy with its Wilson 95 % interval on the
held-out problems and on the out-of-distribution ones, tokens / latents / forward passes per answer, the
last phase-1 latent gains (zeros / noise / shuffle); then exact McNemar tests between rows on the same
problems (per-problem outcomes from the samples files, which hold every problem when
`eval.num_samples >= eval.limit`). Beside the rows, a `constant answer` row gives every problem the
commonest reference answer of its split: on a Yes/No task a row must beat it to show that it reads the
question at all. A row evaluated after phase 2 as well (`rlatent train`) gets a second
line, and a paired test against its own phase-1 start; so does an `rlatent grpo` run, against the row whose
checkpoint its `grpo.init_checkpoint` names. That table also counts, before and after, the answers equal to
the constant answer, and the problems right whose reference is another answer: together they show a phase 2
that gains by saying the commonest answer more often. The JSON keeps every number, so the tables can be
regenerated from it alone (`--from-json`), and rows kept only as an earlier JSON (their run directories
gone) can join new runs' table and paired tests (`--with`, checked to be graded on the same problems).
`--rows` keeps only the rows named.
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path

import yaml

from rlatent.io.run_dir import read_metrics
from rlatent.run.stats import (constant_answer, constant_answer_split, discordant_pairs, mcnemar_exact,
                              wilson_interval)

ROWS = ["cot", "nocot", "pause", "latent", "latent_two"]
SPLITS = {"test": "", "ood": "_ood"}  # split -> suffix of its phase and samples file
CONSTANT = "constant answer"  # the row that answers every problem with the commonest reference
# Where each phase's final evaluation is, by the kind of run: (metrics phase, samples file stem) per phase.
RUN_KINDS = {
    "train": {"sft": ("test_sft", "eval_samples_sft"), "grpo": ("test", "eval_samples")},  # `rlatent train`
    "sft": {"sft": ("test", "eval_samples")},                                            # `rlatent sft`
    "grpo": {"grpo": ("test", "eval_samples")},                  # `rlatent grpo` from grpo.init_checkpoint
}


def samples(run: Path, stem: str, suffix: str) -> list[dict] | None:
    path = run / "samples" / f"{stem}{suffix}.jsonl"
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_row(run: Path, row: str) -> str:
    """The row whose phase-1 checkpoint an `rlatent grpo` run started from (its `grpo.init_checkpoint`,
    `<row>-seed<s>/checkpoints/step_N`); without one, what the name says (`<row>-grpo`, or an
    `rlatent train` run's own row)."""
    config = run / "config.yaml"
    init = (yaml.safe_load(config.read_text()) or {}).get("grpo", {}).get("init_checkpoint") if config.is_file() else None
    return Path(init).parent.parent.name.rpartition("-seed")[0] if init else named_start(row)


def named_start(row: str) -> str:
    """The start a run's name gives: `<row>-grpo` started from `<row>` (the convention the JSON of older
    ladders, which kept no "start", relies on)."""
    return row.removesuffix("-grpo")


def collect(root: Path) -> list[dict]:
    """One record per (row, seed, phase) with its metrics and per-problem outcomes."""
    records = []
    for run in sorted(p for p in root.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file()):
        row, _, seed = run.name.rpartition("-seed")
        metrics = read_metrics(run / "metrics.jsonl")
        phases = {r["phase"] for r in metrics}
        # `rlatent train` names phase 1's evaluation test_sft (also when phase 2 was stopped before it finished)
        kind = "train" if "test_sft" in phases else "sft" if "train" in phases else "grpo"
        gains = next((r for r in reversed(metrics) if r["phase"] == "eval"), {})  # phase 1's diagnostics
        for phase, (name, stem) in RUN_KINDS[kind].items():
            record = {"row": row, "seed": int(seed or 0), "phase": phase, "run": str(run),
                      "start": start_row(run, row) if phase == "grpo" else row,
                      "gains": {k: gains.get(f"latent_gain_{k}") if phase == "sft" else None
                                for k in ("zeros", "noise", "shuffle")}}
            for split, suffix in SPLITS.items():
                found = [r for r in metrics if r["phase"] == name + suffix]
                if found:
                    record[split] = {k: found[-1].get(k) for k in ("accuracy", "strict_match", "tokens_per_answer",
                                                                   "latents_per_answer", "forward_passes_per_answer",
                                                                   "problems")}
                    graded = samples(run, stem, suffix)
                    record[split]["outcomes"] = None if graded is None else [int(x["correct"]) for x in graded]
                    record[split]["references"] = None if graded is None else [x.get("reference") for x in graded]
                    record[split]["predictions"] = None if graded is None else [x.get("predicted") for x in graded]
            records.append(record)
    return records


def pooled(records: list[dict], row: str, phase: str, split: str, seeds: set[int] | None = None,
           field: str = "outcomes") -> list | None:
    """The row's per-problem outcomes (or another per-problem `field`) over its seeds (or only `seeds`),
    concatenated in seed order; None when a run lacks them."""
    runs = sorted((r for r in records if r["row"] == row and r["phase"] == phase and split in r
                   and (seeds is None or r["seed"] in seeds)), key=lambda r: r["seed"])
    if not runs or any(r[split].get(field) is None for r in runs):
        return None
    return [o for r in runs for o in r[split][field]]


def paired(records: list[dict], a: tuple[str, str], b: tuple[str, str], split: str, field: str = "outcomes"):
    """Outcomes (or another per-problem `field`) of (row, phase) `a` and `b` on the same problems: the seeds
    both have, in seed order."""
    def seeds(row, phase):
        return {r["seed"] for r in records if r["row"] == row and r["phase"] == phase and split in r}

    common = seeds(*a) & seeds(*b)
    oa, ob = pooled(records, *a, split, common, field), pooled(records, *b, split, common, field)
    return (oa, ob) if common and oa and ob and len(oa) == len(ob) else (None, None)


def constant_answer_records(records: list[dict]) -> list[dict]:
    """The `constant answer` row (`rlatent.run.stats.constant_answer`), one record per seed and phase the
    rows have: on each split, the commonest reference of the problems every row of a seed was graded on."""
    references = {split: {} for split in SPLITS}  # split -> seed -> references, the same for every row
    for rec in records:
        for split in SPLITS:
            if rec.get(split, {}).get("references") and None not in rec[split]["references"]:
                references[split].setdefault(rec["seed"], rec[split]["references"])
    answers = {split: constant_answer(refs) for split, refs in references.items() if refs}
    constant = []
    for phase in sorted({rec["phase"] for rec in records}):
        for seed in sorted(references["test"]):
            record = {"row": CONSTANT, "seed": seed, "phase": phase, "start": CONSTANT,
                      "gains": dict.fromkeys(("zeros", "noise", "shuffle"))}
            for split, (answer, outcomes) in answers.items():
                if seed in outcomes:
                    record[split] = {"answer": answer, "accuracy": sum(outcomes[seed]) / len(outcomes[seed]),
                                     "outcomes": outcomes[seed], "problems": len(outcomes[seed])}
            constant.append(record)
    return constant


def answer_shifts(records: list[dict], before: tuple[str, str], after: tuple[str, str], split: str,
                  answer: str | None) -> tuple[str, str]:
    """`n -> m` twice (`rlatent.run.stats.constant_answer_split`), on the problems `before` and `after` share:
    how many each answered with the constant answer, and how many each got right whose reference is another
    answer (blank without a constant answer, or for runs whose samples kept no predictions or references)."""
    fields = [paired(records, before, after, split, field) for field in ("predictions", "outcomes", "references")]
    if answer is None or any(pair[0] is None for pair in fields):
        return "", ""
    counts = [constant_answer_split(answer, *per_run) for per_run in zip(*fields)]
    return tuple(" -> ".join(str(c[i]) for c in counts) for i in (0, 1))


def fmt(x, digits=3):
    return "" if x is None else f"{x:.{digits}f}"


def tables(records: list[dict]) -> str:
    lines = []
    order = [r for r in ROWS if any(rec["row"] == r for rec in records)]
    order += sorted({rec["row"] for rec in records} - set(order))
    # The row each phase-2 run started from (JSON written before "start" was kept: by name); taken before the
    # constant answer joins, which has no start of its own.
    starts = {rec["row"]: rec.get("start", named_start(rec["row"])) for rec in records if rec["phase"] == "grpo"}
    constant = constant_answer_records(records)
    answer = {split: constant[0][split]["answer"] for split in SPLITS if constant and split in constant[0]}
    if constant:
        records, order = records + constant, order + [CONSTANT]
        lines += ["`constant answer`: " + ", ".join(f'"{said}" on {split}' for split, said in answer.items())
                  + " (the commonest reference)", ""]
    for phase in ("sft", "grpo"):
        present = [row for row in order if pooled(records, row, phase, "test") is not None]
        if not present:
            continue
        lines += [f"### After phase {1 if phase == 'sft' else 2}", "",
                  "| row | seeds | accuracy [95% CI] | OOD accuracy [95% CI] | tokens/answer | latents/answer | "
                  "passes/answer | gain zeros | gain noise | gain shuffle |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in present:
            runs = [r for r in records if r["row"] == row and r["phase"] == phase and "test" in r]  # finished ones
            cells = []
            for split in ("test", "ood"):
                o = pooled(records, row, phase, split)
                if o:
                    low, high = wilson_interval(sum(o), len(o))
                    cells.append(f"{sum(o) / len(o):.3f} [{low:.3f}, {high:.3f}] (n={len(o)})")
                else:
                    cells.append("")
            means = [None if row == CONSTANT else sum(r["test"][key] for r in runs) / len(runs)
                     for key in ("tokens_per_answer", "latents_per_answer", "forward_passes_per_answer")]
            gains = [sum(r["gains"][k] or 0.0 for r in runs) / len(runs) if any(r["gains"][k] is not None for r in runs)
                     else None for k in ("zeros", "noise", "shuffle")]
            lines.append(f"| {row} | {len(runs)} | {cells[0]} | {cells[1]} | "
                         + " | ".join([fmt(m, 1) for m in means] + [fmt(g, 4) for g in gains]) + " |")
        if len(present) > 1:
            lines += ["", "Paired exact McNemar tests (same problems, the seeds both rows have; "
                      "`a only` / `b only`: problems only that row got right):",
                      "", "| a | b | split | a only | b only | p |", "|---|---|---|---:|---:|---:|"]
            for a, b in combinations(present, 2):
                for split in ("test", "ood"):
                    oa, ob = paired(records, (a, phase), (b, phase), split)
                    if oa:
                        only_a, only_b = discordant_pairs(oa, ob)
                        lines.append(f"| {a} | {b} | {split} | {only_a} | {only_b} | {mcnemar_exact(only_a, only_b):.4f} |")
        lines.append("")
    # The same policy before and after phase 2, on the same problems: one `rlatent train` run, or an
    # `rlatent grpo` run from a row's phase-1 checkpoint.
    lifted = [(starts[after], after) for after in order if after in starts
              if pooled(records, starts[after], "sft", "test") is not None and pooled(records, after, "grpo", "test") is not None]
    if lifted:
        lines += ["### Phase 2 against its own phase-1 start", "",
                  "| row | split | phase 1 | phase 2 | phase 1 only | phase 2 only | p | says the constant answer, "
                  "phase 1 -> 2 | right, other answers, phase 1 -> 2 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row, after_row in lifted:
            for split in ("test", "ood"):
                before, after = paired(records, (row, "sft"), (after_row, "grpo"), split)
                if before:
                    only_before, only_after = discordant_pairs(before, after)
                    pair = (records, (row, "sft"), (after_row, "grpo"), split, answer.get(split))
                    lines.append(f"| {after_row} | {split} | {sum(before) / len(before):.3f} | {sum(after) / len(after):.3f} | "
                                 f"{only_before} | {only_after} | {mcnemar_exact(only_before, only_after):.4f} | "
                                 f"{' | '.join(answer_shifts(*pair))} |")
        lines.append("")
    return "\n".join(lines)


def same_problems(records: list[dict]) -> None:
    """Stop with one line unless every record of a seed and split was graded on the same references: rows
    joined from an earlier JSON must come from the same problems for the paired tests to mean anything."""
    seen: dict[tuple[int, str], tuple[str, list]] = {}
    for rec in records:
        for split in SPLITS:
            refs = rec.get(split, {}).get("references")
            if refs and None not in refs:
                first = seen.setdefault((rec["seed"], split), (rec.get("run", rec["row"]), refs))
                if first[1] != refs:
                    raise SystemExit(f"ladder_table: {rec.get('run', rec['row'])} and {first[0]} were graded on different "
                                     f"{split} problems (seed {rec['seed']}); they cannot share a table")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the directory holding the rows' run directories (or a JSON with --from-json)")
    parser.add_argument("--json", help="write every record here")
    parser.add_argument("--from-json", action="store_true", help="ROOT is a JSON written by --json")
    parser.add_argument("--with", dest="earlier", action="append", default=[], metavar="JSON",
                        help="also the rows of this earlier --json output (a row ROOT has too is taken from ROOT)")
    parser.add_argument("--rows", help="comma-separated rows to keep (default: every row)")
    args = parser.parse_args()
    records = json.loads(Path(args.root).read_text()) if args.from_json else collect(Path(args.root))
    for path in args.earlier:
        have = {rec["row"] for rec in records}
        records += [rec for rec in json.loads(Path(path).read_text()) if rec["row"] not in have]
    if args.rows:
        keep = args.rows.split(",")
        records = [rec for rec in records if rec["row"] in keep]
    same_problems(records)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records) + "\n")
    print(tables(records))

if __name__ == "__main__":
    main()
