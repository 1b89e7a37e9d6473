"""`rlatent compare`: two evaluations of the same problems, paired problem by problem, over one or more seeds.

    rlatent compare runs/latent-seed0 runs/pause-seed0                    # two runs' final evaluations
    rlatent compare start=runs/x/samples/eval_samples_sft.jsonl end=runs/x/samples/eval_samples.jsonl
    rlatent compare --a runs/pause-seed0 runs/pause-seed1 --b runs/latent-seed0 runs/latent-seed1 --json d.json

Each evaluation is a run directory (its final evaluation's samples, `--phase sft` its phase-1 one, `--ood` the
out-of-distribution split's) or a samples file that a run or `rlatent eval` wrote; a `NAME=` in front names it
in the table. Rows are paired by question text, not by position or `source` (`synthetic:17` is another
problem under another data seed): files whose questions differ are refused. Per seed: accuracies, the
problems only one side got right and the exact McNemar p; over the seeds (`--a`/`--b`, the i-th of each a
pair of the same seed), B - A with the hierarchical bootstrap of `rlatent.run.stats.paired_difference`.
Where the evaluations come from run directories, accuracy is also split by whether a problem's arithmetic
was in that run's training problems (`rlatent.run.overlap`).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from rlatent.errors import ConfigError, RlatentError, first_line
from rlatent.io.atomic import atomic_write_text
from rlatent.io.run_dir import RunDir, metrics_table, read_metrics
from rlatent.run.resume import read_run_record
from rlatent.run.stats import discordant_pairs, mcnemar_exact, paired_difference


@dataclass
class Graded:
    """One evaluation: its per-problem outcomes, and what the table says about where they come from."""

    label: str
    path: Path                   # the samples file
    questions: list[str]
    correct: list[int]
    split: str | None            # dev / test / ood, where known
    seed: int | None             # the run's seed, for a run directory
    run: Path | None = None      # the run directory it came from


def held_out_split(config: dict) -> str:
    """The in-distribution split a run evaluates on: its `eval.split`; `test` for a run from before the dev
    split existed, which had no other."""
    return (config.get("eval") or {}).get("split", "test")


def read_samples(path: Path) -> tuple[list[str], list[int]]:
    """(questions, 0/1 outcomes) of a samples JSONL file, in its order."""
    questions, correct = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            questions.append(row["question"])
            correct.append(int(bool(row["correct"])))
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{path}:{number}: not a samples row with 'question' and 'correct' "
                              f"({first_line(error)})") from None
    if not questions:
        raise ConfigError(f"{path}: no samples rows")
    return questions, correct


def _run_samples(run: Path, phase: str, ood: bool) -> tuple[Path, str]:
    """The samples file of a run's `phase` ("final" or "sft") evaluation and the metrics phase it logged."""
    command, suffix = read_run_record(RunDir(run, create=False)).get("command"), "_ood" if ood else ""
    if phase == "final" or command == "sft":  # an `rlatent sft` run's final evaluation is phase 1's
        return run / "samples" / f"eval_samples{suffix}.jsonl", f"test{suffix}"
    if command == "grpo":
        raise ConfigError(f"{run}: an `rlatent grpo` run has no phase-1 evaluation; compare it with its start's run")
    return run / "samples" / f"eval_samples_sft{suffix}.jsonl", f"test_sft{suffix}"


def _logged_problems(run: Path, metrics_phase: str) -> int | None:
    """How many problems the run's last evaluation logged as `metrics_phase` graded (None: none logged)."""
    path = run / "metrics.jsonl"
    found = [r for r in read_metrics(path) if r.get("phase") == metrics_phase] if path.is_file() else []
    return int(found[-1]["problems"]) if found and "problems" in found[-1] else None


def _read(path: Path, parse) -> dict:
    """`parse` of the file's text (JSON or YAML), {} when there is no such file; one line when it does not parse."""
    if not path.is_file():
        return {}
    try:
        return parse(path.read_text(encoding="utf-8")) or {}
    except (ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: does not parse ({first_line(error)})") from None


def load_graded(argument: str, phase: str = "final", ood: bool = False) -> Graded:
    """`[NAME=]RUN_DIR` or `[NAME=]SAMPLES.jsonl` -> its outcomes. A samples file holds only the first
    `eval.num_samples` problems: one with fewer rows than its evaluation graded is refused, since pairing it
    would compare a few problems as if they were all."""
    name, sep, rest = argument.partition("=")
    label, target = (name, Path(rest)) if sep and name and not Path(argument).exists() else (argument, Path(argument))
    run, graded = None, None
    if target.is_dir():
        if not (target / "config.yaml").is_file():
            raise ConfigError(f"{target}: not a run directory (no config.yaml)")
        run = target
        path, metrics_phase = _run_samples(run, phase, ood)
        config = _read(run / "config.yaml", yaml.safe_load)
        split, seed = "ood" if ood else held_out_split(config), config.get("seed")
        graded = _logged_problems(run, metrics_phase)
    elif target.is_file():
        path, seed = target, None
        metrics = _read(path.parent / "metrics.json", json.loads)  # beside the samples of `rlatent eval`
        split, graded = metrics.get("split"), metrics.get("problems")
    else:
        raise ConfigError(f"{argument}: neither a run directory nor a samples file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such samples file (has the run finished that evaluation?)")
    questions, correct = read_samples(path)
    if graded is not None and graded > len(questions):
        raise ConfigError(f"{path}: holds {len(questions)} of the {graded} problems graded (eval.num_samples "
                          f"< problems); evaluate again with eval.num_samples={graded}")
    return Graded(label, path, questions, correct, split, seed, run)


def pair_by_question(a: Graded, b: Graded) -> tuple[list[str], list[int], list[int]]:
    """(questions, outcomes of A, outcomes of B), in A's order; the k-th repeat of a question in A pairs with
    its k-th repeat in B. Refused unless both graded the same questions."""
    missing_b = Counter(a.questions) - Counter(b.questions)
    missing_a = Counter(b.questions) - Counter(a.questions)
    if missing_a or missing_b:
        raise ConfigError(f"{b.path}: {sum(missing_a.values())} of its {len(b.questions)} questions are not in "
                          f"{a.path} and {sum(missing_b.values())} of that file's are not in it (another data draw "
                          "or split?); compare evaluations of the same problems")
    rows = defaultdict(list)
    for question, outcome in zip(reversed(b.questions), reversed(b.correct)):
        rows[question].append(outcome)
    return a.questions, a.correct, [rows[q].pop() for q in a.questions]


def seen_by_question(graded: Graded) -> dict[str, bool]:
    """Question -> whether its arithmetic was in the training problems of the run that `graded` comes from
    (`rlatent.run.overlap.seen_arithmetic`), its train split and held-out split rebuilt from its config."""
    from rlatent.config import load_config
    from rlatent.data.splits import load_split
    from rlatent.run.overlap import seen_arithmetic

    cfg = load_config(graded.run / "config.yaml")
    train = load_split(cfg.data, "train", cfg.data.train_limit)[0]
    problems = load_split(cfg.data, graded.split)[0]
    return dict(zip((p.question for p in problems), seen_arithmetic(train, problems)))


def _seen_flags(a: Graded, b: Graded, questions: list[str], notes: list[str]) -> list[bool] | None:
    """Per paired question, seen arithmetic by A's run (B's where A is a samples file); None with a note when
    neither is a run or its problems cannot be rebuilt.

    Rows trained on differently written marks (the stepwise chain's `data.split_steps` against one mark of
    two operations) have seen different arithmetic; the split stays A's, and a note says how many questions
    B's own training would class otherwise, so a reader knows whose "seen" the table shows."""
    source = a if a.run is not None else b if b.run is not None else None
    if source is None:
        return None
    flags = _flags_of(source, questions, notes)
    if flags is None or source is b or b.run is None:
        return flags
    other = _flags_of(b, questions, [])
    differing = None if other is None else sum(x != y for x, y in zip(flags, other))
    if differing:
        notes.append(f"seen/unseen arithmetic is by {a.label}'s training problems; by {b.label}'s, {differing} of "
                     f"the {len(questions)} questions would be classed the other way (the runs' marks differ)")
    return flags


def _flags_of(source: Graded, questions: list[str], notes: list[str]) -> list[bool] | None:
    """Per question, whether `source`'s run trained on its arithmetic; None with a note when it cannot say."""
    try:
        seen = seen_by_question(source)
    except RlatentError as error:
        notes.append(f"seen/unseen arithmetic not computed for {source.run}: {first_line(error)}")
        return None
    unknown = sum(q not in seen for q in questions)
    if unknown:
        notes.append(f"seen/unseen arithmetic not computed: {unknown} questions of {source.path} are not in the "
                     f"{source.split} split its config rebuilds")
        return None
    return [seen[q] for q in questions]


def _difference(groups: list[tuple[list[str], list[int], list[int]]]) -> dict:
    """Pooled accuracies and `paired_difference` of (questions, A, B) groups, one per seed."""
    a = [x for _, xs, _ in groups for x in xs]
    b = [y for _, _, ys in groups for y in ys]
    return {"accuracy_a": sum(a) / len(a), "accuracy_b": sum(b) / len(b), **asdict(paired_difference(groups))}


def compare(a_side: list[Graded], b_side: list[Graded]) -> dict:
    """A against B, seed by seed (`a_side[i]` with `b_side[i]`) and pooled; by seen arithmetic where known."""
    notes: list[str] = []
    seeds, groups, flags = [], [], []
    for a, b in zip(a_side, b_side, strict=True):
        if a.seed is not None and b.seed is not None and a.seed != b.seed:
            raise ConfigError(f"{b.label} (seed {b.seed}) is paired with {a.label} (seed {a.seed}): list both "
                              "sides in the same seed order")
        questions, ca, cb = pair_by_question(a, b)
        only_a, only_b = discordant_pairs(ca, cb)
        seeds.append({"seed": a.seed if a.seed is not None else b.seed, "a": str(a.path), "b": str(b.path),
                      "problems": len(questions), "accuracy_a": sum(ca) / len(ca), "accuracy_b": sum(cb) / len(cb),
                      "only_a": only_a, "only_b": only_b, "p": mcnemar_exact(only_a, only_b)})
        groups.append((questions, ca, cb))
        flags.append(_seen_flags(a, b, questions, notes))
    result = {"a": a_side[0].label if len(a_side) == 1 else "A", "b": b_side[0].label if len(b_side) == 1 else "B",
              "splits": sorted({g.split or "unknown" for g in a_side + b_side}), "seeds": seeds,
              "pooled": _difference(groups), "arithmetic": {}, "notes": notes}
    if all(f is not None for f in flags):
        for name, want in (("seen", True), ("unseen", False)):
            subset = [tuple([v for v, s in zip(values, seen) if s == want] for values in group)
                      for group, seen in zip(groups, flags)]
            subset = [group for group in subset if group[0]]
            if subset:
                result["arithmetic"][name] = _difference(subset)
    return result


ARITHMETIC = {"seen": "in training", "unseen": "not in training"}


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def render(result: dict) -> str:
    """One comparison as markdown: per seed, then pooled, then by seen arithmetic."""
    a, b, pooled = result["a"], result["b"], result["pooled"]
    rows = [{"seed": "" if s["seed"] is None else s["seed"], "problems": s["problems"],
             f"accuracy {a}": f"{s['accuracy_a']:.3f}", f"accuracy {b}": f"{s['accuracy_b']:.3f}",
             f"{a} only": s["only_a"], f"{b} only": s["only_b"], "p (exact McNemar)": f"{s['p']:.4g}"}
            for s in result["seeds"]]
    columns = ["seed", "problems", f"accuracy {a}", f"accuracy {b}", f"{a} only", f"{b} only", "p (exact McNemar)"]
    lines = [f"## {a} against {b} ({', '.join(result['splits'])} split)", ""]
    lines += [f"{a}: {', '.join(s['a'] for s in result['seeds'])}",
              f"{b}: {', '.join(s['b'] for s in result['seeds'])}", "", metrics_table(rows, columns)]
    lines.append(f"{b} - {a} = {_signed(pooled['difference'])} [95 % {_signed(pooled['low'])}, "
                 f"{_signed(pooled['high'])}], p = {pooled['p']:.4g} ({pooled['test']}; {pooled['seeds']} seed"
                 f"{'s' if pooled['seeds'] > 1 else ''}, {pooled['pairs']} pairs of {pooled['problems']} distinct "
                 f"problems; accuracy {pooled['accuracy_a']:.3f} -> {pooled['accuracy_b']:.3f})")
    if result["arithmetic"]:
        by = [{"arithmetic": ARITHMETIC[name], "problems": d["pairs"], f"accuracy {a}": f"{d['accuracy_a']:.3f}",
               f"accuracy {b}": f"{d['accuracy_b']:.3f}",
               f"{b} - {a} [95 %]": f"{_signed(d['difference'])} [{_signed(d['low'])}, {_signed(d['high'])}]",
               "p": f"{d['p']:.4g}"} for name, d in result["arithmetic"].items()]
        lines += ["", metrics_table(by, ["arithmetic", "problems", f"accuracy {a}", f"accuracy {b}",
                                         f"{b} - {a} [95 %]", "p"])]
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def compare_command(sources: list[str], a: list[str], b: list[str], phase: str, ood: bool,
                    json_path: str | None) -> int:
    """The CLI's `rlatent compare`: every pair of SOURCES, or --a against --b seed by seed."""
    if sources and (a or b):
        raise ConfigError("rlatent compare: give evaluations to compare pairwise, or --a ... --b ..., not both")
    if a or b:
        if len(a) != len(b):
            raise ConfigError(f"rlatent compare: --a has {len(a)} evaluations and --b {len(b)}; give one per seed "
                              "on each side, in the same seed order")
        sides = [([load_graded(x, phase, ood) for x in a], [load_graded(y, phase, ood) for y in b])]
    else:
        if len(sources) < 2:
            raise ConfigError("rlatent compare: give at least two evaluations (run directories or samples files)")
        graded = [load_graded(x, phase, ood) for x in sources]
        sides = [([x], [y]) for x, y in itertools.combinations(graded, 2)]
    results = [compare(x, y) for x, y in sides]
    print("\n".join(render(r) for r in results), end="")
    if json_path:
        atomic_write_text(Path(json_path), json.dumps({"phase": phase, "ood": ood, "comparisons": results},
                                                       indent=1) + "\n")
        print(f"wrote {json_path}")
    return 0
