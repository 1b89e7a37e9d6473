"""The numbers of an `rlatent ablate` table, from its cells' records alone (so they can be rebuilt from
ablation.json): rows pooled over seeds, paired comparisons, phase 2 against each cell's own phase 1.

Two grid points are compared seed s against seed s on the same problems. Over several seeds the comparison is
`rlatent.run.stats.paired_difference` (the difference with its 95 % interval and p from a hierarchical
bootstrap: seeds that met the same problems count them once); with one seed, its exact McNemar p. A problem
is known by its seed's problem list (`questions_sha1`) and its position there, so seeds that share a list
share their problems and seeds with their own data draws do not.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import asdict
from typing import Any

from rlatent.run.stats import (constant_answer, constant_answer_split, mean_t_interval, paired_difference,
                               wilson_interval)

SPLITS = {"test": "in distribution", "ood": "out of distribution"}
"""The held-out slots of a cell record: `test` holds the in-distribution split its `eval.split` names (dev or
test; each split record says which), `ood` the out-of-distribution one."""
GAINS = ("zeros", "noise", "shuffle")
DIAGNOSTIC_KEYS = tuple(f"latent_gain_{g}" for g in GAINS) + ("start_f1", "stop_f1", "next_step_loss")
CONSTANT = "constant answer"


def with_constant_answer(cells: list[dict]) -> list[dict]:
    """`cells` and, after them, one cell per seed for the `constant answer` row: on each split, every problem
    answered with the commonest reference (`rlatent.run.stats.constant_answer`). A split gets one only where
    every finished cell of a seed was graded on the same problems with their references recorded (cells of
    an ablation.json written before references were kept have none)."""
    done = [c for c in cells if c["status"] == "done"]
    constant = {seed: {"id": f"{CONSTANT},seed={seed}", "overrides": [CONSTANT], "seed": seed, "status": "done",
                       "splits": {}} for seed in sorted({c["seed"] for c in done})}
    for split in SPLITS:
        graded = {}  # seed -> the one split record its cells share
        for seed in constant:
            mine = [c["splits"][split] for c in done if c["seed"] == seed and split in c["splits"]]
            if mine and all(m.get("references") for m in mine) and len({m["questions_sha1"] for m in mine}) == 1:
                graded[seed] = mine[0]
        if not graded:
            continue
        answer, outcomes = constant_answer({seed: g["references"] for seed, g in graded.items()})
        for seed, g in graded.items():
            correct = outcomes[seed]
            constant[seed]["splits"][split] = {
                "answer": answer, "correct": correct, "problems": len(correct), "split": g.get("split", split),
                "questions_sha1": g["questions_sha1"], "metrics": {"accuracy": sum(correct) / len(correct)},
                **({"seen": g["seen"]} if "seen" in g else {})}
    return cells + [c for c in constant.values() if "test" in c["splits"]]


def point_of(cell: dict) -> str:
    """The row a cell belongs to: its point's name and grid values (older records: its overrides)."""
    return cell.get("point") or ", ".join(cell["overrides"]) or "(config)"


def points(cells: list[dict]) -> dict[str, list[dict]]:
    """Grid point -> its cells (one per seed), in the order the cells were planned."""
    grouped: dict[str, list[dict]] = {}
    for cell in cells:
        grouped.setdefault(point_of(cell), []).append(cell)
    return grouped


def split_label(cells: list[dict], slot: str) -> str:
    """Which data split the numbers of `slot` come from: `dev`, `test` or `ood` (several joined by `/` when the
    cells differ, as a grid over eval.split makes them; records from before the name was kept: the slot)."""
    names = {c["splits"][slot].get("split", slot) for c in cells
             if c["status"] == "done" and slot in c.get("splits", {})}
    return "/".join(sorted(names)) or slot


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def by_arithmetic(seen: list[int], *outcomes: list[int]) -> dict[str, list[int]]:
    """{"seen": [problems, right in each of `outcomes`], "unseen": [...]}: the problems split by whether their
    arithmetic was in training (`seen`, one 0/1 flag per problem)."""
    return {name: [sum(1 for f in seen if f == want), *(sum(v for v, f in zip(o, seen) if f == want) for o in outcomes)]
            for name, want in (("seen", 1), ("unseen", 0))}


def aggregate(cells: list[dict]) -> list[dict]:
    """One row per grid point over its finished seeds: pooled accuracy with its Wilson interval, the seeds'
    mean with its t interval, accuracy on seen and unseen arithmetic, per split; means of the cost and
    latent-gain columns; mean wall time."""
    rows = []
    for point, group in points(cells).items():
        done = [c for c in group if c["status"] == "done"]
        row: dict[str, Any] = {"point": point, "overrides": group[0]["overrides"], "seeds": len(group),
                               "seeds_done": len(done),
                               "errors": sorted({c["error"] for c in group if c["status"] == "failed"})}
        for split in SPLITS:
            have = [c["splits"][split] for c in done if split in c.get("splits", {})]
            outcomes = [x for s in have for x in s["correct"]]
            if not outcomes:
                continue
            mean, low, high = mean_t_interval([s["metrics"]["accuracy"] for s in have])
            row[split] = {"correct": sum(outcomes), "problems": len(outcomes),
                          "accuracy": sum(outcomes) / len(outcomes),
                          "wilson95": list(wilson_interval(sum(outcomes), len(outcomes))),
                          "seed_mean": mean, "seed_t95": None if low is None else [low, high],
                          "arithmetic": (by_arithmetic([f for s in have for f in s["seen"]], outcomes)
                                         if all("seen" in s for s in have) else None)}
        for key in ("strict_match", "tokens_per_answer", "latents_per_answer", "forward_passes_per_answer"):
            row[key] = _mean([c["splits"]["test"]["metrics"][key] for c in done
                              if key in c["splits"]["test"]["metrics"]])
        for key in DIAGNOSTIC_KEYS[:3]:
            row[key] = _mean([c["diagnostics"][key] for c in done if key in c.get("diagnostics", {})])
        row["wall_seconds"] = _mean([c["wall_seconds"] for c in done if c.get("wall_seconds") is not None])
        rows.append(row)
    return rows


def paired(pairs: list[tuple[dict, dict]]) -> dict[str, Any]:
    """Split records of A and B, seed by seed on the same problems -> accuracies, discordant counts and B - A
    (`paired_difference`: its interval, its p and which test gave it); where A's records flag seen arithmetic,
    [problems, A right, B right] on the problems with seen and with unseen arithmetic."""
    groups = [([(x["questions_sha1"], i) for i in range(len(x["correct"]))], x["correct"], y["correct"])
              for x, y in pairs]
    result = asdict(paired_difference(groups))
    del result["seeds"]  # the caller's record names them
    a = [v for _, xs, _ in groups for v in xs]
    b = [v for _, _, ys in groups for v in ys]
    test = {"problems": result.pop("pairs"), "distinct": result.pop("problems"), "accuracy_a": sum(a) / len(a),
            "accuracy_b": sum(b) / len(b), **result}
    if all("seen" in x for x, _ in pairs):
        test["arithmetic"] = by_arithmetic([f for x, _ in pairs for f in x["seen"]], a, b)
    return test


def paired_tests(cells: list[dict]) -> list[dict]:
    """B - A between every pair of grid points, per split, over the seeds both finished (seed s of one against
    seed s of the other, on the same problems); pairs whose problems differ (a grid over the data or
    eval.limit) are not tested."""
    tests = []
    for (a, cells_a), (b, cells_b) in itertools.combinations(points(cells).items(), 2):
        for split in SPLITS:
            by_seed_b = {c["seed"]: c for c in cells_b if c["status"] == "done" and split in c["splits"]}
            mine = [(c["seed"], c["splits"][split], by_seed_b[c["seed"]]["splits"][split]) for c in cells_a
                    if c["status"] == "done" and split in c["splits"] and c["seed"] in by_seed_b]
            if not mine:
                continue
            pairs = [(x, y) for _, x, y in mine]
            test = {"a": a, "b": b, "split": split, "seeds": [seed for seed, _, _ in mine]}
            if all(x["questions_sha1"] == y["questions_sha1"] for x, y in pairs):
                tests.append({**test, **paired(pairs)})
            else:
                tests.append({**test, "problems": None, "p": None, "note": "different problems: not paired"})
    return tests


def phase_two_tests(cells: list[dict]) -> list[dict]:
    """Per grid point of `rlatent ablate --command train` (or `--phase2`) and split: phase 2 against its own
    phase-1 start, on the same problems, over the seeds (`paired`, B = phase 2); and, with the `constant
    answer` cells present, how many problems each phase answered with that answer and how many it got right
    with another (`constant_answer_split`): a phase 2 that gains only by saying the commonest answer more
    often shows as the first count rising and the second flat. Also the answer phase 2 gives most, said
    before and after, and the shuffle gain (mean over the seeds) after each phase: whether phase 2 kept the
    latents problem-specific."""
    answers = {split: c["splits"][split]["answer"] for c in cells if c["overrides"] == [CONSTANT]
               for split in c["splits"]}
    tests = []
    for point, group in points(cells).items():
        for split in SPLITS:
            pairs = [(c["phase1_splits"][split], c["splits"][split]) for c in group
                     if c["status"] == "done" and split in c.get("phase1_splits", {}) and split in c["splits"]
                     and c["phase1_splits"][split]["questions_sha1"] == c["splits"][split]["questions_sha1"]]
            if not pairs:
                continue
            test = {"point": point, "split": split, "seeds": len(pairs), **paired(pairs)}
            gains = [(c["diagnostics"]["latent_gain_shuffle"], c["phase2_diagnostics"]["latent_gain_shuffle"])
                     for c in group if c["status"] == "done"
                     and "latent_gain_shuffle" in c.get("diagnostics", {})
                     and "latent_gain_shuffle" in c.get("phase2_diagnostics", {})]
            if gains:
                test["shuffle_gain"] = [_mean([pair[i] for pair in gains]) for i in (0, 1)]
            if all(e.get("predictions") for pair in pairs for e in pair):
                test.update(_answer_drift(pairs, answers.get(split)))
            tests.append(test)
    return tests


def _answer_drift(pairs: list[tuple[dict, dict]], answer: str | None) -> dict[str, Any]:
    """What phase 2 says most, how often each phase said it, and the constant answer's counts before and after."""
    said = [[p for pair in pairs for p in pair[i]["predictions"]] for i in (0, 1)]
    drift: dict[str, Any] = {}
    # what phase 2 says most: where a drift goes, which need not be the constant answer (the reward pays the
    # training prompts' commonest answer, not the evaluation's)
    top = Counter(p for p in said[1] if p is not None).most_common(1)
    if top:
        drift.update({"top_answer": top[0][0], "says_top": [x.count(top[0][0]) for x in said]})
    if answer is not None:
        counts = [[constant_answer_split(answer, e["predictions"], e["correct"], e["references"]) for e in pair]
                  for pair in pairs]
        drift.update({"constant_answer": answer, "says_constant": [sum(c[i][0] for c in counts) for i in (0, 1)],
                      "right_other": [sum(c[i][1] for c in counts) for i in (0, 1)]})
    return drift
